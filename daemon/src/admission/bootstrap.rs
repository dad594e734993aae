//! What the webhook Deployment sets up in the cluster, idempotently, at every start:
//! the interception CA (a Secret created once: the first replica to create it wins,
//! the others read it), its own serving pair (likewise) and the `caBundle` of the
//! webhook configurations, and in every namespace the ConfigMap agent pods take their
//! `ca.crt` from (the cluster CA plus the interception CA), kept as namespaces come.
use std::{collections::BTreeMap, net::IpAddr};

use futures_util::StreamExt;
use k8s_openapi::{
    ByteString,
    api::{
        admissionregistration::v1::{MutatingWebhookConfiguration, ValidatingWebhookConfiguration},
        core::v1::{ConfigMap, Namespace, Pod, Secret, Service},
        discovery::v1::EndpointSlice,
    },
};
use kube::{
    Api, Client,
    api::{ListParams, Patch, PatchParams, PostParams},
    runtime::{WatchStreamExt, watcher},
};
use tracing::{info, warn};

use super::mutate::CA_CONFIGMAP;
use crate::tls;

#[derive(Debug, thiserror::Error)]
pub enum BootstrapError {
    #[error("{what}: {source}")]
    Api {
        what: String,
        #[source]
        source: kube::Error,
    },
    #[error(transparent)]
    Issue(#[from] tls::IssueError),
    #[error("Secret {0} has no `{1}`")]
    Incomplete(String, String),
}

fn api(what: impl Into<String>) -> impl FnOnce(kube::Error) -> BootstrapError {
    let what = what.into();
    move |source| BootstrapError::Api { what, source }
}

/// The Secret `name`'s string data, created from `make()` if it does not exist yet.
/// A concurrent creator wins and its content is returned.
pub async fn secret_once(
    client: &Client,
    ns: &str,
    name: &str,
    make: impl FnOnce() -> Result<BTreeMap<String, String>, BootstrapError>,
) -> Result<BTreeMap<String, String>, BootstrapError> {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), ns);
    let read = |s: Secret| -> BTreeMap<String, String> {
        s.data
            .unwrap_or_default()
            .into_iter()
            .map(|(k, v)| (k, String::from_utf8_lossy(&v.0).into_owned()))
            .collect()
    };
    if let Some(s) = secrets
        .get_opt(name)
        .await
        .map_err(api(format!("reading Secret {ns}/{name}")))?
    {
        return Ok(read(s));
    }
    let data = make()?;
    let s = Secret {
        metadata: kube::api::ObjectMeta {
            name: Some(name.into()),
            namespace: Some(ns.into()),
            labels: Some(
                [(
                    "app.kubernetes.io/part-of".to_string(),
                    "portcullis".to_string(),
                )]
                .into(),
            ),
            ..Default::default()
        },
        data: Some(
            data.iter()
                .map(|(k, v)| (k.clone(), ByteString(v.clone().into_bytes())))
                .collect(),
        ),
        ..Default::default()
    };
    match secrets.create(&PostParams::default(), &s).await {
        Ok(_) => {
            info!(secret = %format!("{ns}/{name}"), "created");
            Ok(data)
        }
        Err(kube::Error::Api(e)) if e.code == 409 => {
            let s = secrets
                .get(name)
                .await
                .map_err(api(format!("reading Secret {ns}/{name}")))?;
            Ok(read(s))
        }
        Err(e) => Err(api(format!("creating Secret {ns}/{name}"))(e)),
    }
}

/// The image this pod runs (the barrier runs the same image).
pub async fn own_image(client: &Client, ns: &str) -> Result<String, BootstrapError> {
    let name = std::env::var("POD_NAME").unwrap_or_default();
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let p = pods.get(&name).await.map_err(api(format!(
        "reading this pod {ns}/{name} (POD_NAME) for its image"
    )))?;
    p.spec
        .and_then(|s| s.containers.into_iter().next())
        .and_then(|c| c.image)
        .ok_or_else(|| BootstrapError::Incomplete(format!("pod {ns}/{name}"), "image".into()))
}

/// The API server's addresses agents may dial: the `kubernetes` Service's ClusterIP
/// and the endpoints of its EndpointSlices.
pub async fn apiserver_ips(client: &Client) -> Result<Vec<IpAddr>, BootstrapError> {
    let mut ips = Vec::new();
    let svc: Api<Service> = Api::namespaced(client.clone(), "default");
    let s = svc
        .get("kubernetes")
        .await
        .map_err(api("reading Service default/kubernetes"))?;
    for ip in s
        .spec
        .and_then(|s| s.cluster_ips.or(s.cluster_ip.map(|i| vec![i])))
        .unwrap_or_default()
    {
        if let Ok(ip) = ip.parse() {
            ips.push(ip);
        }
    }
    let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), "default");
    let lp = ListParams::default().labels("kubernetes.io/service-name=kubernetes");
    for sl in slices
        .list(&lp)
        .await
        .map_err(api("listing the kubernetes EndpointSlices"))?
    {
        for ep in sl.endpoints.iter().flatten() {
            ips.extend(ep.addresses.iter().filter_map(|a| a.parse::<IpAddr>().ok()));
        }
    }
    ips.sort();
    ips.dedup();
    Ok(ips)
}

/// The interception CA: `ca.crt` and `ca.key`, created once.
pub async fn interception_ca(
    client: &Client,
    ns: &str,
    secret: &str,
    extra_names: &[String],
    extra_ips: &[IpAddr],
) -> Result<(String, String), BootstrapError> {
    let mut ips = apiserver_ips(client).await?;
    ips.extend_from_slice(extra_ips);
    let data = secret_once(client, ns, secret, || {
        info!(?ips, "creating the interception CA, constrained to the API server's names and these addresses");
        let p = tls::interception_ca(extra_names, &ips)?;
        Ok([("ca.crt".to_string(), p.cert_pem), ("ca.key".to_string(), p.key_pem)].into())
    })
    .await?;
    let get = |k: &str| {
        data.get(k)
            .cloned()
            .ok_or_else(|| BootstrapError::Incomplete(secret.into(), k.into()))
    };
    Ok((get("ca.crt")?, get("ca.key")?))
}

/// The webhook's serving pair (created once) and the CA to put in `caBundle`.
/// Returns (caBundle PEM, cert PEM, key PEM).
pub async fn serving_pair(
    client: &Client,
    ns: &str,
    secret: &str,
    service: &str,
) -> Result<(String, String, String), BootstrapError> {
    let names = vec![
        format!("{service}.{ns}.svc"),
        format!("{service}.{ns}.svc.cluster.local"),
        format!("{service}.{ns}"),
    ];
    let data = secret_once(client, ns, secret, || {
        let (ca, leaf) = tls::webhook_serving(&names)?;
        Ok([
            ("ca.crt".to_string(), ca.cert_pem),
            ("tls.crt".to_string(), leaf.cert_pem),
            ("tls.key".to_string(), leaf.key_pem),
        ]
        .into())
    })
    .await?;
    let get = |k: &str| {
        data.get(k)
            .cloned()
            .ok_or_else(|| BootstrapError::Incomplete(secret.into(), k.into()))
    };
    Ok((get("ca.crt")?, get("tls.crt")?, get("tls.key")?))
}

/// Sets `caBundle` in every webhook of the mutating and validating configurations
/// named `name`.
pub async fn patch_ca_bundle(
    client: &Client,
    name: &str,
    ca_pem: &str,
) -> Result<(), BootstrapError> {
    let bundle = serde_json::Value::String(base64_encode(ca_pem.as_bytes()));
    let m: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
    let cfg = m
        .get(name)
        .await
        .map_err(api(format!("reading MutatingWebhookConfiguration {name}")))?;
    let ops = ops_for(cfg.webhooks.map(|w| w.len()).unwrap_or(0), &bundle);
    m.patch(name, &PatchParams::default(), &Patch::Json::<()>(ops))
        .await
        .map_err(api(format!("patching MutatingWebhookConfiguration {name}")))?;
    let v: Api<ValidatingWebhookConfiguration> = Api::all(client.clone());
    let cfg = v.get(name).await.map_err(api(format!(
        "reading ValidatingWebhookConfiguration {name}"
    )))?;
    let ops = ops_for(cfg.webhooks.map(|w| w.len()).unwrap_or(0), &bundle);
    v.patch(name, &PatchParams::default(), &Patch::Json::<()>(ops))
        .await
        .map_err(api(format!(
            "patching ValidatingWebhookConfiguration {name}"
        )))?;
    info!(name, "caBundle set on the webhook configurations");
    Ok(())
}

fn base64_encode(b: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(b)
}

fn ops_for(n: usize, bundle: &serde_json::Value) -> json_patch::Patch {
    let ops: Vec<serde_json::Value> = (0..n)
        .map(|i| serde_json::json!({"op": "add", "path": format!("/webhooks/{i}/clientConfig/caBundle"), "value": bundle}))
        .collect();
    serde_json::from_value(serde_json::Value::Array(ops)).unwrap_or(json_patch::Patch(vec![]))
}

/// Keeps `portcullis-root-ca.crt` (cluster CA + interception CA) in every namespace.
pub async fn publish_ca_bundle(client: Client, bundle: String) {
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let stream = watcher(namespaces, watcher::Config::default())
        .default_backoff()
        .applied_objects();
    let mut stream = std::pin::pin!(stream);
    let pp = PatchParams::apply("portcullis").force();
    while let Some(ev) = stream.next().await {
        let ns = match ev {
            Ok(n) => n,
            Err(e) => {
                warn!(error = %e, "namespace watch (retrying)");
                continue;
            }
        };
        let Some(name) = ns.metadata.name.clone() else {
            continue;
        };
        if ns.metadata.deletion_timestamp.is_some() {
            continue;
        }
        let cm = serde_json::json!({
            "apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": CA_CONFIGMAP, "namespace": name,
                         "labels": {"app.kubernetes.io/part-of": "portcullis"}},
            "data": {"ca.crt": bundle},
        });
        let api: Api<ConfigMap> = Api::namespaced(client.clone(), &name);
        if let Err(e) = api.patch(CA_CONFIGMAP, &pp, &Patch::Apply(&cm)).await {
            warn!(namespace = %name, error = %e, "publishing the CA bundle");
        }
    }
}
