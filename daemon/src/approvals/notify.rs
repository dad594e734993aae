//! Telling approvers that a request waits for them: a webhook, as generic JSON or as a
//! Slack-compatible `{"text": ...}` message. Delivery runs in the background with
//! retries, so a slow or down webhook never delays the held request's own timer.
use std::time::Duration;

use serde_json::json;
use tracing::{info, warn};

use super::Approval;
use crate::{
    config::{Webhook, WebhookFormat},
    tls::{self, HttpClient},
    util::{escape_json, slack_code},
};

const ATTEMPTS: u32 = 3;
/// Deliveries in flight at once; past this an approval is not announced (it is still
/// listed by `portcullis approvals list`), so a webhook that hangs cannot pile up tasks.
const IN_FLIGHT: usize = 64;

#[derive(Clone)]
pub struct Notifier {
    url: String,
    format: WebhookFormat,
    client: HttpClient,
    in_flight: std::sync::Arc<tokio::sync::Semaphore>,
}

impl Notifier {
    pub fn new(cfg: &Webhook) -> Result<Notifier, tls::HttpError> {
        Ok(Notifier {
            url: cfg.url.clone(),
            format: cfg.format,
            client: tls::https_client(cfg.ca_file.as_deref(), true)?,
            in_flight: std::sync::Arc::new(tokio::sync::Semaphore::new(IN_FLIGHT)),
        })
    }

    /// The message. Every field an agent or its token chose (names, paths, the
    /// subject) is escaped for the reader: no control characters or invisible
    /// reordering anywhere; in Slack, each inside a code span with no markup, links or
    /// mentions.
    pub fn body(&self, a: &Approval) -> serde_json::Value {
        let approve = format!("portcullis approvals approve {}", a.id);
        let deny = format!("portcullis approvals deny {} --reason '...'", a.id);
        match self.format {
            WebhookFormat::Generic => {
                let mut v = json!({
                    "kind": "ApprovalRequested",
                    "approval": a,
                    "approveCommand": approve,
                    "denyCommand": deny,
                });
                escape_json(&mut v);
                v
            }
            WebhookFormat::Slack => json!({
                "text": format!(
                    ":lock: Portcullis approval {id}: {who} wants to {req} ({method} {path}{q}) (rule {rule}: {msg}). \
                     Approve: {approve} · Deny: {deny} · expires <!date^{exp}^{{date_short_pretty}} {{time}}|{exp}>",
                    id = slack_code(&a.id),
                    who = slack_code(&a.subject.username),
                    req = slack_code(&a.request.to_string()),
                    method = slack_code(&a.scope.method),
                    path = slack_code(&a.scope.path),
                    q = if a.scope.query.is_empty() { String::new() } else { format!(" ?{}", slack_code(&a.scope.query)) },
                    rule = slack_code(&a.rule),
                    msg = slack_code(&a.message),
                    approve = slack_code(&approve),
                    deny = slack_code(&deny),
                    exp = a.expires_at,
                ),
            }),
        }
    }

    /// Sends in the background; logs the outcome.
    pub fn announce(&self, a: &Approval) {
        let this = self.clone();
        let body = serde_json::to_vec(&self.body(a)).unwrap_or_default();
        let id = a.id.clone();
        let Ok(permit) = self.in_flight.clone().try_acquire_owned() else {
            warn!(approval = %id, limit = IN_FLIGHT, "too many approval webhooks in flight: approvers are not notified of this one; it is listed by `portcullis approvals list`");
            return;
        };
        tokio::spawn(async move {
            let _permit = permit;
            for attempt in 1..=ATTEMPTS {
                match tls::post_json(&this.client, &this.url, body.clone()).await {
                    Ok(_) => {
                        info!(approval = %id, url = %this.url, "approvers notified");
                        return;
                    }
                    Err(e) => {
                        warn!(approval = %id, attempt, error = %e, "approval webhook failed");
                        tokio::time::sleep(Duration::from_secs(u64::from(attempt))).await;
                    }
                }
            }
            warn!(approval = %id, "approvers were not notified; the approval is listed by `portcullis approvals list`");
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        approvals::{State, model::SubjectRecord},
        k8s::Attributes,
    };

    fn approval() -> Approval {
        Approval {
            id: "apr-1".into(),
            created_at: 1,
            expires_at: 2,
            subject: SubjectRecord {
                username: "system:serviceaccount:e2e:agent".into(),
                groups: vec![],
                issuer: "k8s".into(),
                subject: "system:serviceaccount:e2e:agent".into(),
                token_id: "t".into(),
                pod: None,
            },
            request: Attributes {
                verb: "delete".into(),
                api_group: "apps".into(),
                resource: "deployments".into(),
                subresource: String::new(),
                namespace: "prod".into(),
                name: "web".into(),
                path: String::new(),
            },
            scope: Default::default(),
            rule: "workload-deletes".into(),
            message: "needs a human".into(),
            approvers: vec![],
            grant_ttl_secs: 60,
            state: State::Pending,
            grant_id: None,
        }
    }

    fn notifier(format: WebhookFormat) -> Notifier {
        Notifier::new(&Webhook {
            url: "http://127.0.0.1:9/hook".into(),
            format,
            ca_file: None,
        })
        .unwrap()
    }

    #[tokio::test]
    async fn fields_an_agent_chose_cannot_ping_link_or_escape_the_terminal() {
        let mut a = approval();
        a.request.name =
            "web <!channel> <https://evil.example|approve here> @here \u{1b}[2J`".into();
        a.subject.username = "system:serviceaccount:e2e:agent\u{202e}".into();
        let s = notify(WebhookFormat::Slack).body(&a);
        let text = s["text"].as_str().unwrap();
        assert!(
            !text.contains("<!channel>") && !text.contains("<https://evil"),
            "{text}"
        );
        assert!(
            !text.contains("@here") && !text.contains('\u{1b}') && !text.contains('\u{202e}'),
            "{text}"
        );
        assert!(
            text.contains("&lt;!channel&gt;") && text.contains("\\u{1b}[2J"),
            "{text}"
        );
        // Only the daemon's own date markup remains.
        assert_eq!(text.matches('<').count(), 1, "{text}");
        let g = notify(WebhookFormat::Generic).body(&a);
        let name = g["approval"]["request"]["name"].as_str().unwrap();
        assert!(
            !name.contains('\u{1b}') && name.contains("\\u{1b}"),
            "{name}"
        );
    }

    fn notify(f: WebhookFormat) -> Notifier {
        notifier(f)
    }

    #[tokio::test]
    async fn generic_and_slack_bodies_carry_the_approval_and_the_command() {
        let g = notifier(WebhookFormat::Generic).body(&approval());
        assert_eq!(g["kind"], "ApprovalRequested");
        assert_eq!(g["approval"]["id"], "apr-1");
        assert_eq!(g["approval"]["state"], "pending");
        assert_eq!(g["approveCommand"], "portcullis approvals approve apr-1");
        let s = notifier(WebhookFormat::Slack).body(&approval());
        let text = s["text"].as_str().unwrap();
        assert!(
            text.contains("apr-1") && text.contains("delete deployments.apps web in prod"),
            "{text}"
        );
        assert!(
            text.contains("portcullis approvals approve apr-1"),
            "{text}"
        );
    }
}
