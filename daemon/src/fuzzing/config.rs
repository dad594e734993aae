//! The config file: `${VAR}` expansion, YAML parse and validation, masking rules.
use std::path::Path;

use crate::{config, mask::Masking};

pub fn config(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let expanded = config::env::expand(&text, |n| {
        (!n.starts_with("UNSET")).then(|| "10.0.0.7".into())
    });
    // Without a `${`, expansion changes nothing (`$${` aside, which needs one).
    if !text.contains("${")
        && let Ok(e) = &expanded
    {
        assert_eq!(e, &*text);
    }
    let text = expanded.unwrap_or_else(|_| text.into_owned());
    let Ok(cfg) = config::Config::parse(&text, Path::new("fuzz.yaml")) else {
        return;
    };
    let _ = cfg.state();
    let _ = cfg.admin_socket();
    if let Some(p) = &cfg.proxy
        && p.masking.fingerprint_key_file.is_none()
    {
        let _ = Masking::from_config(&p.masking);
    }
}
