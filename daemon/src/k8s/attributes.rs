//! What an approval and its grant are scoped to: a request's Kubernetes attributes,
//! written the way people read them (`delete deployments.apps web in prod`).
use serde::{Deserialize, Serialize};

use super::RequestInfo;

/// What a grant is scoped to: the request's Kubernetes attributes.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Hash)]
pub struct Attributes {
    pub verb: String,
    #[serde(default)]
    pub api_group: String,
    #[serde(default)]
    pub resource: String,
    #[serde(default)]
    pub subresource: String,
    #[serde(default)]
    pub namespace: String,
    #[serde(default)]
    pub name: String,
    /// Non-resource requests only.
    #[serde(default)]
    pub path: String,
}

impl From<&RequestInfo> for Attributes {
    fn from(r: &RequestInfo) -> Self {
        Attributes {
            verb: r.verb.to_string(),
            api_group: r.api_group.to_string(),
            resource: r.resource.to_string(),
            subresource: r.subresource.to_string(),
            namespace: r.namespace.to_string(),
            name: r.name.to_string(),
            path: if r.is_resource_request {
                String::new()
            } else {
                r.path.clone()
            },
        }
    }
}

impl std::fmt::Display for Attributes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if !self.path.is_empty() {
            return write!(f, "{} {}", self.verb, self.path);
        }
        let mut res = self.resource.clone();
        if !self.api_group.is_empty() {
            res = format!("{res}.{}", self.api_group);
        }
        if !self.subresource.is_empty() {
            res = format!("{res}/{}", self.subresource);
        }
        write!(f, "{} {res}", self.verb)?;
        if !self.name.is_empty() {
            write!(f, " {}", self.name)?;
        }
        if !self.namespace.is_empty() {
            write!(f, " in {}", self.namespace)?;
        }
        Ok(())
    }
}
