//! Kubernetes' own vocabulary, with Kubernetes' own names: a request's attributes as
//! the apiserver's RequestInfo resolver computes them, the attributes a grant is
//! scoped to and the exact request it covers, who a user is (authentication.k8s.io
//! UserInfo), which pod, the resourceVersion precondition of a write, the
//! metav1.Status errors are sent as, and the protobuf encoding of the objects where
//! credentials live. Pure data and functions; no I/O.
mod attributes;
mod pod;
mod precondition;
mod protobuf;
mod request_info;
mod scope;
mod status;
mod user;

pub use attributes::Attributes;
pub use pod::PodRef;
pub use precondition::{PreconditionError, parse_body, with_resource_version};
#[cfg(test)]
pub(crate) use protobuf::encode as protobuf_encode;
pub use protobuf::{ProtobufError, protobuf_to_json};
pub use request_info::{RequestInfo, RequestInfoError, field_selector_value, resolve};
pub use scope::RequestScope;
pub use status::{Status, StatusCause, StatusDetails};
pub use user::UserInfo;
