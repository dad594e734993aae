//! Kubernetes request attributes, resolved exactly as the apiserver's RequestInfo
//! resolver does (k8s.io/apiserver/pkg/endpoints/request/requestinfo.go), so policy and
//! audit speak the vocabulary RBAC and the audit log already use.
use compact_str::{CompactString, ToCompactString};
use serde::{Deserialize, Serialize};

/// The attributes of one request (the apiserver's `RequestInfo`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct RequestInfo {
    pub is_resource_request: bool,
    /// The request path (for non-resource requests this is what RBAC matches).
    pub path: String,
    pub verb: CompactString,
    #[serde(skip_serializing_if = "CompactString::is_empty")]
    pub api_prefix: CompactString,
    #[serde(skip_serializing_if = "CompactString::is_empty")]
    pub api_group: CompactString,
    #[serde(skip_serializing_if = "CompactString::is_empty")]
    pub api_version: CompactString,
    #[serde(skip_serializing_if = "CompactString::is_empty")]
    pub namespace: CompactString,
    #[serde(skip_serializing_if = "CompactString::is_empty")]
    pub resource: CompactString,
    #[serde(skip_serializing_if = "CompactString::is_empty")]
    pub subresource: CompactString,
    #[serde(skip_serializing_if = "CompactString::is_empty")]
    pub name: CompactString,
}

impl RequestInfo {
    /// The verb an upgraded request is authorized as. Since 1.35 the apiserver
    /// authorizes a WebSocket GET to `pods/exec|attach|portforward` as `create`, as it
    /// does the SPDY POST (KEP-4006; a `get` on those subresources no longer suffices),
    /// so policy and audit decide it as `create` too.
    pub fn upgraded(mut self) -> RequestInfo {
        if self.is_resource_request
            && self.verb == "get"
            && self.api_group.is_empty()
            && self.resource == "pods"
            && matches!(self.subresource.as_str(), "exec" | "attach" | "portforward")
        {
            self.verb = "create".into();
        }
        self
    }

    /// A request the API server treats as long-running (kube-apiserver's
    /// `BasicLongRunningRequestCheck`: the verbs `watch` and `proxy`, and on resources the
    /// subresources `attach`, `exec`, `proxy`, `log` and `portforward`): its answer is a
    /// stream, not a body sent whole.
    pub fn is_long_running(&self) -> bool {
        matches!(self.verb.as_str(), "watch" | "proxy")
            || (self.is_resource_request
                && matches!(
                    self.subresource.as_str(),
                    "attach" | "exec" | "proxy" | "log" | "portforward"
                ))
    }
}

/// Why a resource path could not be resolved; the apiserver answers these with 404/400.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RequestInfoError {
    #[error("unable to determine kind and namespace from url {0}")]
    SpecialVerbWithoutResource(String),
    /// A resource request whose method the API server serves no resource with
    /// (OPTIONS, CONNECT, anything unknown): there is no verb to decide on. The
    /// resolver gives such requests an empty verb, as the apiserver's does; the gate
    /// refuses them with this.
    #[error("the method {0:?} is not one the Kubernetes API serves resources with")]
    UnsupportedMethod(String),
}

const API_PREFIXES: &[&str] = &["api", "apis"];
const GROUPLESS_API_PREFIXES: &[&str] = &["api"];
/// Verbs that appear as a path segment before the resource.
const SPECIAL_VERBS: &[&str] = &["proxy", "watch"];
/// Special verbs whose trailing path is not a subresource.
const SPECIAL_VERBS_NO_SUBRESOURCES: &[&str] = &["proxy"];
/// Subresources of a namespace itself (`namespaces/NS/status`).
const NAMESPACE_SUBRESOURCES: &[&str] = &["status", "finalize"];

/// Resolves `method` + `path` (still percent-encoded, as on the wire) + `query`.
pub fn resolve(
    method: &str,
    raw_path: &str,
    query: Option<&str>,
) -> Result<RequestInfo, RequestInfoError> {
    // Go resolves on URL.Path, which is percent-decoded (a path with no escape, nearly
    // every one, is its own decoding: one search instead of a byte-by-byte decode).
    let path = if raw_path.contains('%') {
        percent_encoding::percent_decode_str(raw_path)
            .decode_utf8_lossy()
            .into_owned()
    } else {
        raw_path.to_owned()
    };
    let mut verb = CompactString::from(method);
    verb.as_mut_str().make_ascii_lowercase();
    let mut info = RequestInfo {
        verb,
        ..Default::default()
    };
    resolve_parts(&mut info, &path, method, raw_path, query)?;
    info.path = path;
    Ok(info)
}

/// The attributes `path` (decoded) says, into `info` (its verb the method's).
fn resolve_parts(
    info: &mut RequestInfo,
    path: &str,
    method: &str,
    raw_path: &str,
    query: Option<&str>,
) -> Result<(), RequestInfoError> {
    let trimmed = path.trim_matches('/');
    // Room for the longest resource path (/apis/G/V/namespaces/NS/R/NAME/SUB is 8
    // segments) at once, instead of growing to it.
    let mut all: Vec<&str> = Vec::with_capacity(10);
    if !trimmed.is_empty() {
        all.extend(trimmed.split('/'));
    }
    // Resource paths have at least /api/VERSION/RESOURCE or /apis/GROUP/VERSION.
    if all.len() < 3 || !API_PREFIXES.contains(&all[0]) {
        return Ok(());
    }
    info.api_prefix = all[0].into();
    let mut parts = &all[1..];
    if !GROUPLESS_API_PREFIXES.contains(&info.api_prefix.as_str()) {
        // /apis/GROUP/VERSION/RESOURCE...; shorter is group discovery.
        if parts.len() < 3 {
            return Ok(());
        }
        info.api_group = parts[0].into();
        parts = &parts[1..];
    }
    // At least VERSION and one more part remain here.
    info.api_version = parts[0].into();
    parts = &parts[1..];
    info.is_resource_request = true;

    if SPECIAL_VERBS.contains(&parts[0]) {
        if parts.len() < 2 {
            return Err(RequestInfoError::SpecialVerbWithoutResource(
                raw_path.into(),
            ));
        }
        info.verb = parts[0].into();
        parts = &parts[1..];
    } else {
        info.verb = match method {
            "POST" => "create",
            "GET" | "HEAD" => "get",
            "PUT" => "update",
            "PATCH" => "patch",
            "DELETE" => "delete",
            // As the apiserver's resolver: no verb (its authorizer then refuses).
            _ => "",
        }
        .into();
    }

    if parts[0] == "namespaces" && parts.len() > 1 {
        info.namespace = parts[1].into();
        // namespaces/NS/pods/... : drop the namespace prefix; but
        // namespaces/NS/status is the namespace's own subresource.
        if parts.len() > 2 && !NAMESPACE_SUBRESOURCES.contains(&parts[2]) {
            parts = &parts[2..];
        }
    }

    if parts.len() >= 3 && !SPECIAL_VERBS_NO_SUBRESOURCES.contains(&info.verb.as_str()) {
        info.subresource = parts[2].into();
    }
    if parts.len() >= 2 {
        info.name = parts[1].into();
    }
    if !parts.is_empty() {
        info.resource = parts[0].into();
    }

    // No name and a get: really a list, or a watch.
    if info.name.is_empty() && info.verb == "get" {
        let opts = ListOptions::decode(query.unwrap_or(""));
        info.verb = if opts.watch { "watch" } else { "list" }.into();
        if let Some(name) = opts.field_selector_name
            && is_valid_path_segment_name(&name)
        {
            info.name = name.to_compact_string();
        }
    }
    // No name and a delete: deletecollection.
    if info.name.is_empty() && info.verb == "delete" {
        info.verb = "deletecollection".into();
    }
    Ok(())
}

/// The part of metav1.ListOptions the resolver looks at.
#[derive(Debug, Default, PartialEq, Eq)]
struct ListOptions {
    watch: bool,
    field_selector_name: Option<String>,
}

impl ListOptions {
    /// Mirrors the apiserver: if the query does not decode as ListOptions, `watch` is
    /// still read on its own and the name from a field selector is not used.
    fn decode(query: &str) -> ListOptions {
        let pairs: Vec<(String, String)> = form_urlencoded::parse(query.as_bytes())
            .map(|(k, v)| (k.into_owned(), v.into_owned()))
            .collect();
        let first = |key: &str| {
            pairs
                .iter()
                .find(|(k, _)| k == key)
                .map(|(_, v)| v.as_str())
        };
        // Go's conversion: any value but "0" or "false" (any case) is true.
        let watch = first("watch").is_some_and(|v| !(v == "0" || v.eq_ignore_ascii_case("false")));
        let ints_ok = ["limit", "timeoutSeconds"]
            .iter()
            .all(|k| first(k).is_none_or(|v| parse_go_int64(v).is_some()));
        let selector = first("fieldSelector").map(parse_field_selector);
        let decoded = ints_ok && !matches!(selector, Some(Err(())));
        if !decoded {
            return ListOptions {
                watch,
                field_selector_name: None,
            };
        }
        ListOptions {
            watch,
            field_selector_name: selector
                .and_then(|s| s.ok())
                .and_then(|terms| {
                    terms
                        .into_iter()
                        .find(|t| t.field == "metadata.name" && t.op != Op::NotEquals)
                })
                .map(|t| t.value),
        }
    }
}

/// The value a field selector in `query` pins `field` to (`field=v` or `field==v`),
/// if the selector parses and has such a term.
pub fn field_selector_value(query: &str, field: &str) -> Option<String> {
    let selector = form_urlencoded::parse(query.as_bytes())
        .find(|(k, _)| k == "fieldSelector")
        .map(|(_, v)| v.into_owned())?;
    parse_field_selector(&selector)
        .ok()?
        .into_iter()
        .find(|t| t.field == field && t.op != Op::NotEquals)
        .map(|t| t.value)
}

fn parse_go_int64(v: &str) -> Option<i64> {
    // strconv.ParseInt(v, 10, 64): optional sign, decimal digits.
    let digits = v.strip_prefix(['+', '-']).unwrap_or(v);
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    v.parse().ok()
}

#[derive(Debug, PartialEq, Eq)]
enum Op {
    Equals,
    DoubleEquals,
    NotEquals,
}

#[derive(Debug, PartialEq, Eq)]
struct Term {
    field: String,
    op: Op,
    value: String,
}

/// fields.ParseSelector: comma-separated `field(=|==|!=)value` terms, where `\`
/// escapes `,`, `=` and `\` in values.
fn parse_field_selector(s: &str) -> Result<Vec<Term>, ()> {
    let mut terms = Vec::new();
    for part in split_unescaped(s, ',') {
        if part.is_empty() {
            continue;
        }
        let (field, op, raw) = split_term(&part).ok_or(())?;
        terms.push(Term {
            field: field.to_string(),
            op,
            value: unescape_value(raw)?,
        });
    }
    Ok(terms)
}

fn split_unescaped(s: &str, sep: char) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut escaped = false;
    for c in s.chars() {
        if escaped {
            cur.push('\\');
            cur.push(c);
            escaped = false;
        } else if c == '\\' {
            escaped = true;
        } else if c == sep {
            out.push(std::mem::take(&mut cur));
        } else {
            cur.push(c);
        }
    }
    if escaped {
        cur.push('\\');
    }
    out.push(cur);
    out
}

fn split_term(term: &str) -> Option<(&str, Op, &str)> {
    // The first operator from the left, trying the longer spellings first at each
    // position (as fields.splitTerm does).
    for (i, _) in term.char_indices() {
        let rest = &term[i..];
        for (spelling, op) in [
            ("!=", Op::NotEquals),
            ("==", Op::DoubleEquals),
            ("=", Op::Equals),
        ] {
            if rest.starts_with(spelling) {
                return Some((&term[..i], op, &term[i + spelling.len()..]));
            }
        }
    }
    None
}

fn unescape_value(v: &str) -> Result<String, ()> {
    let mut out = String::with_capacity(v.len());
    let mut chars = v.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => match chars.next() {
                Some(e @ ('\\' | ',' | '=')) => out.push(e),
                _ => return Err(()),
            },
            // An unescaped `=` or `,` in a value is invalid.
            '=' | ',' => return Err(()),
            c => out.push(c),
        }
    }
    Ok(out)
}

/// path.IsValidPathSegmentName: not `.`/`..`, no `/` or `%`.
fn is_valid_path_segment_name(name: &str) -> bool {
    !(name == "." || name == ".." || name.contains('/') || name.contains('%'))
}

#[cfg(test)]
mod tests {

    #[test]
    fn websocket_exec_attach_portforward_are_authorized_as_create() {
        for sub in ["exec", "attach", "portforward"] {
            let path = format!("/api/v1/namespaces/ns/pods/p/{sub}");
            let info = resolve("GET", &path, Some("command=ls")).unwrap();
            assert_eq!(info.verb, "get");
            assert_eq!(info.upgraded().verb, "create", "{sub}");
        }
        // Other upgraded GETs keep their verb (a watch or a log follow asked as an
        // upgrade is no interactive session), and so does the SPDY POST.
        for (method, path) in [
            ("GET", "/api/v1/namespaces/ns/pods/p/log"),
            ("GET", "/api/v1/namespaces/ns/pods"),
            ("GET", "/apis/example.dev/v1/namespaces/ns/pods/p/exec"),
            ("POST", "/api/v1/namespaces/ns/pods/p/exec"),
        ] {
            let info = resolve(method, path, None).unwrap();
            assert_eq!(info.clone().upgraded(), info, "{method} {path}");
        }
    }
    use super::*;

    /// (method, path, query, is_resource, verb, group, version, namespace, resource,
    /// subresource, name)
    type Case = (
        &'static str,
        &'static str,
        &'static str,
        bool,
        &'static str,
        &'static str,
        &'static str,
        &'static str,
        &'static str,
        &'static str,
        &'static str,
    );

    // The table mirrors the upstream resolver's own test cases, plus the requests
    // kubectl sends (shared/notes/kube-api-protocol.md).
    const CASES: &[Case] = &[
        // non-resource
        ("GET", "/version", "", false, "get", "", "", "", "", "", ""),
        ("GET", "/healthz", "", false, "get", "", "", "", "", "", ""),
        ("GET", "/", "", false, "get", "", "", "", "", "", ""),
        ("GET", "/api", "", false, "get", "", "", "", "", "", ""),
        ("GET", "/apis", "", false, "get", "", "", "", "", "", ""),
        ("GET", "/api/v1", "", false, "get", "", "", "", "", "", ""),
        (
            "GET",
            "/apis/apps",
            "",
            false,
            "get",
            "",
            "",
            "",
            "",
            "",
            "",
        ),
        (
            "GET",
            "/apis/apps/v1",
            "",
            false,
            "get",
            "",
            "",
            "",
            "",
            "",
            "",
        ),
        (
            "GET",
            "/openapi/v2",
            "",
            false,
            "get",
            "",
            "",
            "",
            "",
            "",
            "",
        ),
        (
            "POST",
            "/openapi/v3",
            "",
            false,
            "post",
            "",
            "",
            "",
            "",
            "",
            "",
        ),
        (
            "GET",
            "/other/path",
            "",
            false,
            "get",
            "",
            "",
            "",
            "",
            "",
            "",
        ),
        // core resources
        (
            "GET",
            "/api/v1/namespaces",
            "",
            true,
            "list",
            "",
            "v1",
            "",
            "namespaces",
            "",
            "",
        ),
        (
            "GET",
            "/api/v1/namespaces/other",
            "",
            true,
            "get",
            "",
            "v1",
            "other",
            "namespaces",
            "",
            "other",
        ),
        (
            "GET",
            "/api/v1/namespaces/other/pods",
            "",
            true,
            "list",
            "",
            "v1",
            "other",
            "pods",
            "",
            "",
        ),
        (
            "GET",
            "/api/v1/namespaces/other/pods/foo",
            "",
            true,
            "get",
            "",
            "v1",
            "other",
            "pods",
            "",
            "foo",
        ),
        (
            "HEAD",
            "/api/v1/namespaces/other/pods/foo",
            "",
            true,
            "get",
            "",
            "v1",
            "other",
            "pods",
            "",
            "foo",
        ),
        (
            "GET",
            "/api/v1/pods",
            "",
            true,
            "list",
            "",
            "v1",
            "",
            "pods",
            "",
            "",
        ),
        (
            "POST",
            "/api/v1/namespaces/other/pods",
            "",
            true,
            "create",
            "",
            "v1",
            "other",
            "pods",
            "",
            "",
        ),
        (
            "PUT",
            "/api/v1/namespaces/other/pods/foo",
            "",
            true,
            "update",
            "",
            "v1",
            "other",
            "pods",
            "",
            "foo",
        ),
        (
            "PATCH",
            "/api/v1/namespaces/other/pods/foo",
            "",
            true,
            "patch",
            "",
            "v1",
            "other",
            "pods",
            "",
            "foo",
        ),
        (
            "DELETE",
            "/api/v1/namespaces/other/pods/foo",
            "",
            true,
            "delete",
            "",
            "v1",
            "other",
            "pods",
            "",
            "foo",
        ),
        (
            "DELETE",
            "/api/v1/namespaces/other/pods",
            "",
            true,
            "deletecollection",
            "",
            "v1",
            "other",
            "pods",
            "",
            "",
        ),
        (
            "OPTIONS",
            "/api/v1/namespaces/other/pods",
            "",
            true,
            "",
            "",
            "v1",
            "other",
            "pods",
            "",
            "",
        ),
        // trailing slash
        (
            "GET",
            "/api/v1/namespaces/other/pods/foo/",
            "",
            true,
            "get",
            "",
            "v1",
            "other",
            "pods",
            "",
            "foo",
        ),
        // watch by query
        (
            "GET",
            "/api/v1/namespaces/other/pods",
            "watch=true",
            true,
            "watch",
            "",
            "v1",
            "other",
            "pods",
            "",
            "",
        ),
        (
            "GET",
            "/api/v1/namespaces/other/pods",
            "watch=1",
            true,
            "watch",
            "",
            "v1",
            "other",
            "pods",
            "",
            "",
        ),
        (
            "GET",
            "/api/v1/namespaces/other/pods",
            "watch=",
            true,
            "watch",
            "",
            "v1",
            "other",
            "pods",
            "",
            "",
        ),
        (
            "GET",
            "/api/v1/namespaces/other/pods",
            "watch=false",
            true,
            "list",
            "",
            "v1",
            "other",
            "pods",
            "",
            "",
        ),
        (
            "GET",
            "/api/v1/namespaces/other/pods",
            "watch=FALSE",
            true,
            "list",
            "",
            "v1",
            "other",
            "pods",
            "",
            "",
        ),
        (
            "GET",
            "/api/v1/namespaces/other/pods",
            "watch=0",
            true,
            "list",
            "",
            "v1",
            "other",
            "pods",
            "",
            "",
        ),
        (
            "GET",
            "/api/v1/namespaces/other/pods",
            "resourceVersion=12&watch=true&allowWatchBookmarks=true",
            true,
            "watch",
            "",
            "v1",
            "other",
            "pods",
            "",
            "",
        ),
        // a get with a name ignores watch
        (
            "GET",
            "/api/v1/namespaces/other/pods/foo",
            "watch=true",
            true,
            "get",
            "",
            "v1",
            "other",
            "pods",
            "",
            "foo",
        ),
        // legacy watch prefix
        (
            "GET",
            "/api/v1/watch/pods",
            "",
            true,
            "watch",
            "",
            "v1",
            "",
            "pods",
            "",
            "",
        ),
        (
            "GET",
            "/api/v1/watch/namespaces/other/pods",
            "",
            true,
            "watch",
            "",
            "v1",
            "other",
            "pods",
            "",
            "",
        ),
        (
            "GET",
            "/api/v1/watch/namespaces/other/pods/foo",
            "",
            true,
            "watch",
            "",
            "v1",
            "other",
            "pods",
            "",
            "foo",
        ),
        // proxy prefix: the rest of the path is not a subresource
        (
            "GET",
            "/api/v1/proxy/namespaces/other/pods/foo",
            "",
            true,
            "proxy",
            "",
            "v1",
            "other",
            "pods",
            "",
            "foo",
        ),
        (
            "GET",
            "/api/v1/proxy/namespaces/other/pods/foo/a/b",
            "",
            true,
            "proxy",
            "",
            "v1",
            "other",
            "pods",
            "",
            "foo",
        ),
        // subresources
        (
            "GET",
            "/api/v1/namespaces/other/pods/foo/log",
            "follow=true",
            true,
            "get",
            "",
            "v1",
            "other",
            "pods",
            "log",
            "foo",
        ),
        (
            "GET",
            "/api/v1/namespaces/other/pods/foo/exec",
            "command=ls&stdout=true",
            true,
            "get",
            "",
            "v1",
            "other",
            "pods",
            "exec",
            "foo",
        ),
        (
            "POST",
            "/api/v1/namespaces/other/pods/foo/exec",
            "command=ls",
            true,
            "create",
            "",
            "v1",
            "other",
            "pods",
            "exec",
            "foo",
        ),
        (
            "POST",
            "/api/v1/namespaces/other/pods/foo/attach",
            "",
            true,
            "create",
            "",
            "v1",
            "other",
            "pods",
            "attach",
            "foo",
        ),
        (
            "POST",
            "/api/v1/namespaces/other/pods/foo/portforward",
            "",
            true,
            "create",
            "",
            "v1",
            "other",
            "pods",
            "portforward",
            "foo",
        ),
        (
            "GET",
            "/api/v1/namespaces/other/pods/foo/proxy/a/b",
            "",
            true,
            "get",
            "",
            "v1",
            "other",
            "pods",
            "proxy",
            "foo",
        ),
        (
            "PUT",
            "/api/v1/namespaces/other/pods/foo/status",
            "",
            true,
            "update",
            "",
            "v1",
            "other",
            "pods",
            "status",
            "foo",
        ),
        (
            "POST",
            "/api/v1/namespaces/other/pods/foo/eviction",
            "",
            true,
            "create",
            "",
            "v1",
            "other",
            "pods",
            "eviction",
            "foo",
        ),
        (
            "POST",
            "/api/v1/namespaces/other/serviceaccounts/sa/token",
            "",
            true,
            "create",
            "",
            "v1",
            "other",
            "serviceaccounts",
            "token",
            "sa",
        ),
        (
            "PUT",
            "/apis/apps/v1/namespaces/other/deployments/d/scale",
            "",
            true,
            "update",
            "apps",
            "v1",
            "other",
            "deployments",
            "scale",
            "d",
        ),
        // namespace subresources
        (
            "PUT",
            "/api/v1/namespaces/other/status",
            "",
            true,
            "update",
            "",
            "v1",
            "other",
            "namespaces",
            "status",
            "other",
        ),
        (
            "PUT",
            "/api/v1/namespaces/other/finalize",
            "",
            true,
            "update",
            "",
            "v1",
            "other",
            "namespaces",
            "finalize",
            "other",
        ),
        // group resources
        (
            "GET",
            "/apis/apps/v1/namespaces/other/deployments",
            "limit=500",
            true,
            "list",
            "apps",
            "v1",
            "other",
            "deployments",
            "",
            "",
        ),
        (
            "GET",
            "/apis/apps/v1/deployments",
            "",
            true,
            "list",
            "apps",
            "v1",
            "",
            "deployments",
            "",
            "",
        ),
        (
            "POST",
            "/apis/rbac.authorization.k8s.io/v1/clusterroles",
            "",
            true,
            "create",
            "rbac.authorization.k8s.io",
            "v1",
            "",
            "clusterroles",
            "",
            "",
        ),
        (
            "GET",
            "/apis/apps/v1/watch/namespaces/other/deployments",
            "",
            true,
            "watch",
            "apps",
            "v1",
            "other",
            "deployments",
            "",
            "",
        ),
        // fieldSelector metadata.name fills the name (kubectl delete's follow-up watch)
        (
            "GET",
            "/api/v1/namespaces/other/pods",
            "fieldSelector=metadata.name%3Dfoo&watch=true",
            true,
            "watch",
            "",
            "v1",
            "other",
            "pods",
            "",
            "foo",
        ),
        (
            "GET",
            "/api/v1/namespaces/other/pods",
            "fieldSelector=metadata.name%3D%3Dfoo",
            true,
            "list",
            "",
            "v1",
            "other",
            "pods",
            "",
            "foo",
        ),
        (
            "GET",
            "/api/v1/namespaces/other/pods",
            "fieldSelector=spec.nodeName%3Dn,metadata.name%3Dfoo",
            true,
            "list",
            "",
            "v1",
            "other",
            "pods",
            "",
            "foo",
        ),
        (
            "GET",
            "/api/v1/namespaces/other/pods",
            "fieldSelector=metadata.name!%3Dfoo",
            true,
            "list",
            "",
            "v1",
            "other",
            "pods",
            "",
            "",
        ),
        (
            "GET",
            "/api/v1/namespaces/other/pods",
            "fieldSelector=metadata.name%3Dfo%2Fo",
            true,
            "list",
            "",
            "v1",
            "other",
            "pods",
            "",
            "",
        ),
        (
            "GET",
            "/api/v1/namespaces/other/pods",
            "fieldSelector=metadata.name%3D..",
            true,
            "list",
            "",
            "v1",
            "other",
            "pods",
            "",
            "",
        ),
        // an undecodable query drops the selector name but keeps watch
        (
            "GET",
            "/api/v1/namespaces/other/pods",
            "fieldSelector=metadata.name%3Dfoo&limit=abc&watch=true",
            true,
            "watch",
            "",
            "v1",
            "other",
            "pods",
            "",
            "",
        ),
        (
            "GET",
            "/api/v1/namespaces/other/pods",
            "fieldSelector=metadata.name",
            true,
            "list",
            "",
            "v1",
            "other",
            "pods",
            "",
            "",
        ),
        (
            "DELETE",
            "/api/v1/namespaces/other/pods",
            "fieldSelector=metadata.name%3Dfoo",
            true,
            "deletecollection",
            "",
            "v1",
            "other",
            "pods",
            "",
            "",
        ),
        // percent-encoded path is resolved decoded, as Go's URL.Path is
        (
            "GET",
            "/api/v1/namespaces/other/pods/f%6Fo",
            "",
            true,
            "get",
            "",
            "v1",
            "other",
            "pods",
            "",
            "foo",
        ),
        (
            "GET",
            "/api/v1/namespaces/other/pods/a%2Fb",
            "",
            true,
            "get",
            "",
            "v1",
            "other",
            "pods",
            "b",
            "a",
        ),
    ];

    #[test]
    fn every_rule_resolves_as_the_apiserver_does() {
        let mut failures = Vec::new();
        for c in CASES {
            let (method, path, query, res, verb, group, version, ns, resource, sub, name) = *c;
            let got = resolve(method, path, Some(query)).expect(path);
            let want = (res, verb, group, version, ns, resource, sub, name);
            let have = (
                got.is_resource_request,
                got.verb.as_str(),
                got.api_group.as_str(),
                got.api_version.as_str(),
                got.namespace.as_str(),
                got.resource.as_str(),
                got.subresource.as_str(),
                got.name.as_str(),
            );
            if want != have {
                failures.push(format!(
                    "{method} {path}?{query}: want {want:?}, got {have:?}"
                ));
            }
        }
        assert!(failures.is_empty(), "{}", failures.join("\n"));
    }

    #[test]
    fn a_special_verb_without_resource_is_an_error() {
        assert_eq!(
            resolve("GET", "/api/v1/watch", None),
            Err(RequestInfoError::SpecialVerbWithoutResource(
                "/api/v1/watch".into()
            ))
        );
        assert!(resolve("GET", "/api/v1/proxy", None).is_err());
    }

    #[test]
    fn field_selector_escapes() {
        let t = parse_field_selector(r"metadata.name=a\,b,x!=y").unwrap();
        assert_eq!(t[0].value, "a,b");
        assert_eq!(t[1].op, Op::NotEquals);
        assert!(parse_field_selector(r"a=b\q").is_err());
        assert!(parse_field_selector("novalue").is_err());
    }
}
