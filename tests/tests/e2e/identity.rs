//! Agent identity: projected service-account tokens bound to their pod, OIDC tokens
//! from a test IdP, key rotation.
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use portcullis_tests::{
    gate::{IDP_AUDIENCE, OTHER_POD, POD, POD_CA},
    idp::Sign,
};
use serde_json::json;

use crate::{Env, run_bounded, stderr};

/// One HTTPS GET from agent pod `pod` to the Service address with `token` and, if
/// given, an Accept header, by Python's urllib (stdlib only): (status code,
/// Content-Type, body read as latin-1 so any bytes survive).
pub fn agent_request(
    env: &Env,
    pod: &str,
    token: Option<&str>,
    path: &str,
    accept: Option<&str>,
    headers: &[(&str, &str)],
) -> Result<(u16, String, String)> {
    const PY: &str = r#"
import json, ssl, sys, urllib.request, urllib.error
url, ca, token, accept, extra = sys.argv[1:6]
req = urllib.request.Request(url)
if token:
    req.add_header("Authorization", "Bearer " + token)
if accept:
    req.add_header("Accept", accept)
for k, v in json.loads(extra):
    req.add_header(k, v)
ctx = ssl.create_default_context(cafile=ca)
try:
    r = urllib.request.urlopen(req, context=ctx, timeout=20)
    print(json.dumps({"code": r.status, "type": r.headers.get("Content-Type", ""), "body": r.read().decode("latin-1")}))
except urllib.error.HTTPError as e:
    print(json.dumps({"code": e.code, "type": e.headers.get("Content-Type", ""), "body": e.read().decode("latin-1")}))
"#;
    let url = format!("https://{}{path}", env.cluster_ip());
    let extra = serde_json::to_string(headers)?;
    let o = run_bounded(
        env.in_pod(
            pod,
            &[
                "python3",
                "-c",
                PY,
                &url,
                POD_CA,
                token.unwrap_or(""),
                accept.unwrap_or(""),
                &extra,
            ],
        ),
        None,
    )?;
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).with_context(|| {
        format!(
            "python said: {} {}",
            String::from_utf8_lossy(&o.stdout),
            stderr(&o)
        )
    })?;
    Ok((
        v["code"].as_u64().unwrap_or(0) as u16,
        v["type"].as_str().unwrap_or("").to_owned(),
        v["body"].as_str().unwrap_or("").to_owned(),
    ))
}

/// [`agent_request`] without an Accept header: (status code, body).
pub fn agent_get(env: &Env, pod: &str, token: Option<&str>, path: &str) -> Result<(u16, String)> {
    let (code, _, body) = agent_request(env, pod, token, path, None, &[])?;
    Ok((code, body))
}

pub const PODS: &str = "/api/v1/namespaces/e2e/pods";

fn expect_401(env: &Env, pod: &str, token: Option<&str>, needle: &str, what: &str) -> Result<()> {
    let (code, body) = agent_get(env, pod, token, PODS)?;
    ensure!(code == 401, "{what}: expected 401, got {code}: {body}");
    let v: serde_json::Value =
        serde_json::from_str(&body).with_context(|| format!("{what}: {body}"))?;
    ensure!(
        v["kind"] == "Status" && v["reason"] == "Unauthorized",
        "{what}: not a Status: {body}"
    );
    let msg = v["message"].as_str().unwrap_or("");
    ensure!(
        msg.contains(needle),
        "{what}: message `{msg}` lacks `{needle}`"
    );
    Ok(())
}

pub fn projected_tokens(env: &mut Env) -> Result<()> {
    // The token the kubelet mounted in pod `work`, from that pod.
    let token = env.agent_token.clone();
    let (code, body) = agent_get(env, POD, Some(&token), PODS)?;
    ensure!(code == 200, "own pod: {code} {body}");
    // The same token from another pod: stolen.
    expect_401(
        env,
        OTHER_POD,
        Some(&token),
        "bound to pod e2e/work",
        "stolen token",
    )?;
    expect_401(env, POD, None, "no bearer token", "no token")?;
    let wrong_aud = env.agent_token_for(Some(&["not-the-api"]), Some((POD, &env.work_uid)))?;
    expect_401(env, POD, Some(&wrong_aud), "audience", "wrong audience")?;
    // A token that names no pod works from any enrolled pod; the kernel's pod is recorded.
    let unbound = env.agent_token_for(None, None)?;
    let (code, body) = agent_get(env, OTHER_POD, Some(&unbound), PODS)?;
    ensure!(code == 200, "unbound token: {code} {body}");
    let log = env.daemon_log();
    ensure!(
        log.lines()
            .any(|l| l.contains("system:serviceaccount:e2e:agent") && l.contains(&env.other_uid)),
        "no request record with the kernel's pod {}",
        env.other_uid
    );
    ensure!(!log.contains(&token), "a token reached the daemon log");
    Ok(())
}

pub fn idp(env: &Env) -> &portcullis_tests::idp::Idp {
    env.idp.as_ref().expect("gated e2e has an IdP")
}

pub fn oidc(env: &Env, user: &str, groups: &[&str]) -> Result<String> {
    let i = idp(env);
    i.mint(
        &i.claims(user, IDP_AUDIENCE, 600, json!({"groups": groups})),
        Sign::Key("k1"),
    )
}

pub fn oidc_tokens(env: &mut Env) -> Result<()> {
    let i = idp(env);
    let good = oidc(env, "alice", &["devs"])?;
    let (code, body) = agent_get(env, POD, Some(&good), PODS)?;
    ensure!(code == 200, "valid OIDC token: {code} {body}");
    let c = |ttl: i64, extra: serde_json::Value| i.claims("alice", IDP_AUDIENCE, ttl, extra);
    let cases: Vec<(String, &str, &str)> = vec![
        (
            i.mint(&c(-120, json!({})), Sign::Key("k1"))?,
            "expired",
            "expired",
        ),
        (
            i.mint(
                &c(600, json!({"nbf": portcullis_tests::idp::now() + 300})),
                Sign::Key("k1"),
            )?,
            "not valid yet",
            "not yet valid",
        ),
        (
            i.mint(&c(600, json!({"aud": "someone-else"})), Sign::Key("k1"))?,
            "audience",
            "wrong audience",
        ),
        (
            i.mint(
                &c(600, json!({"iss": "https://evil.example"})),
                Sign::Key("k1"),
            )?,
            "not trusted",
            "wrong issuer",
        ),
        (
            i.tampered(&c(600, json!({})), "k1", &json!({"email": "admin"}))?,
            "signature",
            "bad signature",
        ),
        (
            i.mint(&c(600, json!({})), Sign::HmacWithPublicKey("k1"))?,
            "HS256 is not allowed",
            "alg confusion",
        ),
        (
            i.mint(&c(600, json!({})), Sign::None)?,
            "not a well-formed JWT",
            "alg none",
        ),
    ];
    for (token, needle, what) in &cases {
        expect_401(env, POD, Some(token), needle, what)?;
    }
    // A key the IdP has not published yet: unknown kid, until it is published (rotation
    // without a restart; the refetch is rate-limited to one per 10 s).
    i.keygen("k2")?;
    let rotated = i.mint(&c(600, json!({"groups": ["devs"]})), Sign::Key("k2"))?;
    expect_401(env, POD, Some(&rotated), "key id `k2`", "unknown kid")?;
    i.publish(&["k1", "k2"])?;
    let t = Instant::now();
    loop {
        let (code, body) = agent_get(env, POD, Some(&rotated), PODS)?;
        if code == 200 {
            break;
        }
        ensure!(
            t.elapsed() < Duration::from_secs(25),
            "rotated key still refused after 25 s: {code} {body}"
        );
        std::thread::sleep(Duration::from_secs(1));
    }
    println!(
        "    rotated key accepted {:.1} s after publishing",
        t.elapsed().as_secs_f64()
    );
    Ok(())
}
