//! Who a user is, as authentication.k8s.io's UserInfo says it: what policy subjects
//! and approvers are matched against.
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserInfo {
    /// `system:serviceaccount:NS:NAME`, or an IdP user with its prefix.
    pub username: String,
    pub groups: Vec<String>,
}

impl UserInfo {
    /// A service account's identity, as the API server names it.
    pub fn service_account(namespace: &str, name: &str) -> UserInfo {
        UserInfo {
            username: format!("system:serviceaccount:{namespace}:{name}"),
            groups: vec![
                "system:serviceaccounts".into(),
                format!("system:serviceaccounts:{namespace}"),
            ],
        }
    }

    /// `(namespace, name)` for a service account's username.
    pub fn service_account_name(&self) -> Option<(&str, &str)> {
        self.username
            .strip_prefix("system:serviceaccount:")?
            .split_once(':')
    }
}
