//! A request as policy sees it: who asks, its attributes and query, the pod it comes
//! from, and (when a condition reads them) the objects it acts on; and the `request`
//! variable of conditions, in the shape of admission.k8s.io's AdmissionRequest.
use serde_json::{Value, json};

use super::{condition::Inputs, library};
use crate::k8s::{self, PodRef, RequestInfo, UserInfo};

/// One request, for a decision.
pub struct Request<'a> {
    pub user: &'a UserInfo,
    pub info: &'a RequestInfo,
    /// The raw query string.
    pub query: &'a str,
    /// A create's object name, when its body says it (`metadata.name`).
    pub create_name: Option<String>,
    /// The pod the request comes from, if any.
    pub pod: Option<&'a PodRef>,
}

/// Built-in resources that are not namespaced: a request for them without a
/// namespace does not span namespaces. (Anything not listed, custom resources
/// included, is taken to be namespaced, which only makes restricting rules match
/// more.)
const CLUSTER_SCOPED: &[&str] = &[
    "nodes",
    "persistentvolumes",
    "componentstatuses",
    "clusterroles",
    "clusterrolebindings",
    "storageclasses",
    "csidrivers",
    "csinodes",
    "volumeattachments",
    "volumeattributesclasses",
    "customresourcedefinitions",
    "apiservices",
    "mutatingwebhookconfigurations",
    "validatingwebhookconfigurations",
    "validatingadmissionpolicies",
    "validatingadmissionpolicybindings",
    "mutatingadmissionpolicies",
    "mutatingadmissionpolicybindings",
    "priorityclasses",
    "runtimeclasses",
    "certificatesigningrequests",
    "clustertrustbundles",
    "ingressclasses",
    "ipaddresses",
    "servicecidrs",
    "deviceclasses",
    "resourceslices",
    "flowschemas",
    "prioritylevelconfigurations",
    "tokenreviews",
    "subjectaccessreviews",
    "selfsubjectaccessreviews",
    "selfsubjectrulesreviews",
    "selfsubjectreviews",
];

impl<'a> Request<'a> {
    /// A request with nothing known beyond its attributes.
    pub fn new(user: &'a UserInfo, info: &'a RequestInfo) -> Request<'a> {
        Request {
            user,
            info,
            query: "",
            create_name: None,
            pod: None,
        }
    }

    fn collection(&self) -> bool {
        matches!(
            self.info.verb.as_str(),
            "list" | "watch" | "deletecollection"
        )
    }

    /// The name of the object acted on, if the request pins one.
    pub(super) fn object_name(&self) -> Option<&str> {
        if !self.info.name.is_empty() {
            return Some(&self.info.name);
        }
        if self.info.verb == "create" && self.info.subresource.is_empty() {
            return self.create_name.as_deref();
        }
        None
    }

    /// Whether a request without a name could act on objects of any name: a
    /// collection, or a create whose body does not say the name.
    pub(super) fn could_name_any(&self) -> bool {
        self.collection() || (self.info.verb == "create" && self.info.subresource.is_empty())
    }

    /// The namespace the request is confined to: its own, or the one a field
    /// selector pins (`metadata.namespace=NS` on a list across namespaces).
    pub(super) fn namespace(&self) -> Option<String> {
        if !self.info.namespace.is_empty() {
            return Some(self.info.namespace.to_string());
        }
        if self.collection() {
            return k8s::field_selector_value(self.query, "metadata.namespace");
        }
        None
    }

    /// A request without a namespace that could reach objects in any namespace.
    pub(super) fn spans_namespaces(&self) -> bool {
        self.collection() && !CLUSTER_SCOPED.contains(&self.info.resource.as_str())
    }

    /// Admission's operation for the verb: CREATE, UPDATE, DELETE, CONNECT (exec,
    /// attach, port-forward, proxy), or empty for reads.
    fn operation(&self) -> &'static str {
        if matches!(
            self.info.subresource.as_str(),
            "exec" | "attach" | "portforward" | "proxy"
        ) {
            return "CONNECT";
        }
        match self.info.verb.as_str() {
            "create" => "CREATE",
            "update" | "patch" => "UPDATE",
            "delete" | "deletecollection" => "DELETE",
            _ => "",
        }
    }

    /// The `request` variable.
    pub fn request_value(&self) -> Value {
        let i = self.info;
        let (sa_ns, sa_name) = self.user.service_account_name().unwrap_or(("", ""));
        let query: serde_json::Map<String, Value> = form_urlencoded::parse(self.query.as_bytes())
            .map(|(k, v)| (k.into_owned(), Value::String(v.into_owned())))
            .collect();
        let dry_run = query.contains_key("dryRun");
        json!({
            "operation": self.operation(),
            "verb": i.verb,
            "resource": {"group": i.api_group, "version": i.api_version, "resource": i.resource},
            "subResource": i.subresource,
            "name": self.object_name().unwrap_or(""),
            "namespace": i.namespace,
            "path": i.path,
            "query": query,
            "dryRun": dry_run,
            "userInfo": {"username": self.user.username, "groups": self.user.groups},
            "serviceAccount": {"namespace": sa_ns, "name": sa_name},
            "pod": {
                "namespace": self.pod.and_then(|p| p.namespace.clone()).unwrap_or_default(),
                "name": self.pod.and_then(|p| p.name.clone()).unwrap_or_default(),
                "uid": self.pod.map(|p| p.uid.clone()).unwrap_or_default(),
            },
        })
    }

    /// What conditions are evaluated against: `object` and `oldObject` as obtained
    /// (`None`: not there, e.g. a create has no old object), and why they could not
    /// be obtained, if so.
    pub fn inputs(
        &self,
        object: Option<&Value>,
        old_object: Option<&Value>,
        missing: Option<String>,
    ) -> Inputs<'_> {
        let conv = |v: Option<&Value>| v.map(library::from_json).unwrap_or(cel::Value::Null);
        Inputs::new(
            conv(object),
            conv(old_object),
            move || library::from_json(&self.request_value()),
            missing,
        )
    }
}
