//! Kubernetes' own vocabulary, with Kubernetes' own names: a request's attributes as
//! the apiserver's RequestInfo resolver computes them, the attributes a grant is
//! scoped to, who a user is (authentication.k8s.io UserInfo), which pod, and the
//! metav1.Status errors are sent as. Pure data and functions; no I/O.
mod attributes;
mod pod;
mod request_info;
mod status;
mod user;

pub use attributes::Attributes;
pub use pod::PodRef;
pub use request_info::{RequestInfo, RequestInfoError, field_selector_value, resolve};
pub use status::Status;
pub use user::UserInfo;
