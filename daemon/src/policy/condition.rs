//! Conditions on what a request does: CEL expressions over the vocabulary of a
//! ValidatingAdmissionPolicy — `object` (the object as the request would leave it),
//! `oldObject` (the object as stored before it) and `request` (who asks, for what) —
//! plus the functions of `library`. A rule matches only when every one of its
//! conditions is true.
//!
//! An expression that cannot be evaluated (a field that is not there, a type that
//! does not fit, an object the gate could not obtain) never helps a request: it makes
//! a `deny` or `approve` rule match and an `allow` rule not match.
use std::sync::{Arc, OnceLock};

use cel::{Context, Env, ExecutionError, Program, Value};

use super::library;

/// Which request contents a condition reads.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Needs {
    /// `object`: for creates, updates and patches the object as it would be stored
    /// (the API server's dry run of the same request).
    pub object: bool,
    /// `oldObject`: the object as stored (updates, patches, deletes; for exec,
    /// attach, port-forward and other subresources created on an object, that
    /// object).
    pub old_object: bool,
}

impl Needs {
    pub fn any(&self) -> bool {
        self.object || self.old_object
    }

    pub(super) fn add(&mut self, other: Needs) {
        self.object |= other.object;
        self.old_object |= other.old_object;
    }
}

/// What conditions are evaluated against, converted once per request.
pub struct Inputs {
    pub(super) object: Value,
    pub(super) old_object: Value,
    pub(super) request: Value,
    /// Why `object` or `oldObject` is missing although a condition reads it.
    pub(super) missing: Option<String>,
}

/// A compiled condition.
pub(super) struct Condition {
    pub(super) name: String,
    pub(super) expression: String,
    program: Program,
    pub(super) needs: Needs,
}

impl std::fmt::Debug for Condition {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Condition")
            .field("name", &self.name)
            .field("expression", &self.expression)
            .finish()
    }
}

/// A condition that does not compile, or names something the environment lacks.
#[derive(Debug, thiserror::Error)]
pub enum ConditionError {
    #[error("not a CEL expression: {0}")]
    Parse(String),
    #[error("`{0}` is not defined: conditions read `object`, `oldObject` and `request`")]
    Undeclared(String),
    #[error("the expression is {0} bytes; the limit is {MAX_EXPRESSION}")]
    TooLong(usize),
}

/// Longest expression accepted (Kubernetes allows 5120 characters per expression).
pub const MAX_EXPRESSION: usize = 5120;

/// The outcome of one condition for one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    True,
    False,
    /// Could not be evaluated: why.
    Error(String),
}

pub(super) fn env() -> Arc<Env> {
    static ENV: OnceLock<Arc<Env>> = OnceLock::new();
    ENV.get_or_init(|| {
        let mut env = Env::stdlib();
        // Kubernetes' CEL has the strings and lists libraries; these are cel-go's.
        let _ = env.add_extension(cel::extensions::strings);
        let _ = env.add_extension(cel::extensions::lists);
        Arc::new(env)
    })
    .clone()
}

impl Condition {
    pub(super) fn compile(name: String, expression: &str) -> Result<Condition, ConditionError> {
        if expression.len() > MAX_EXPRESSION {
            return Err(ConditionError::TooLong(expression.len()));
        }
        let program = env()
            .compile(expression)
            .map_err(|e| ConditionError::Parse(e.to_string().replace('\n', " ")))?;
        let refs = program.references();
        let needs = Needs {
            object: refs.has_variable("object"),
            old_object: refs.has_variable("oldObject"),
        };
        let c = Condition {
            name,
            expression: expression.to_owned(),
            program,
            needs,
        };
        // Catch a misspelt variable or function now rather than on every request:
        // evaluate once against empty inputs and look for an undeclared name.
        let probe = Inputs {
            object: Value::Null,
            old_object: Value::Null,
            request: Value::Null,
            missing: None,
        };
        if let Err(ExecutionError::UndeclaredReference(n)) = c.run(&probe) {
            return Err(ConditionError::Undeclared(n.to_string()));
        }
        Ok(c)
    }

    fn run(&self, inputs: &Inputs) -> Result<Value, ExecutionError> {
        let mut ctx = Context::with_env(env());
        ctx.add_variable_from_value("object", inputs.object.clone());
        ctx.add_variable_from_value("oldObject", inputs.old_object.clone());
        ctx.add_variable_from_value("request", inputs.request.clone());
        library::register(&mut ctx);
        self.program.execute(&ctx)
    }

    pub(super) fn eval(&self, inputs: &Inputs) -> Outcome {
        if let Some(why) = &inputs.missing
            && self.needs.any()
        {
            return Outcome::Error(why.clone());
        }
        match self.run(inputs) {
            Ok(Value::Bool(true)) => Outcome::True,
            Ok(Value::Bool(false)) => Outcome::False,
            Ok(other) => Outcome::Error(format!(
                "condition {} evaluated to {other:?}, not a bool",
                self.name
            )),
            Err(e) => Outcome::Error(format!("condition {}: {e}", self.name)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inputs(object: serde_json::Value, old: serde_json::Value) -> Inputs {
        Inputs {
            object: library::from_json(&object),
            old_object: library::from_json(&old),
            request: library::from_json(&serde_json::json!({"operation": "UPDATE"})),
            missing: None,
        }
    }

    #[test]
    fn conditions_read_object_old_object_and_request() {
        let c = Condition::compile(
            "scale-to-zero".into(),
            "oldObject.spec.replicas > 0 && object.spec.?replicas.orValue(1) == 0 && request.operation == 'UPDATE'",
        )
        .unwrap();
        assert_eq!(
            c.needs,
            Needs {
                object: true,
                old_object: true
            }
        );
        let i = inputs(
            serde_json::json!({"spec": {"replicas": 0}}),
            serde_json::json!({"spec": {"replicas": 3}}),
        );
        assert_eq!(c.eval(&i), Outcome::True);
        let i = inputs(
            serde_json::json!({"spec": {"replicas": 0}}),
            serde_json::json!({"spec": {"replicas": 0}}),
        );
        assert_eq!(c.eval(&i), Outcome::False);
        // A field that is not there is an error, not false.
        let i = inputs(serde_json::json!({}), serde_json::json!({}));
        assert!(matches!(c.eval(&i), Outcome::Error(_)));
        let mut i = inputs(
            serde_json::json!({}),
            serde_json::json!({"spec": {"replicas": 1}}),
        );
        i.missing = Some("no dry run".into());
        assert_eq!(c.eval(&i), Outcome::Error("no dry run".into()));
    }

    #[test]
    fn library_functions_are_available() {
        let c = Condition::compile(
            "secrets".into(),
            "podSpecs(object).exists(s, size(secretRefs(s)) > 0 || size(hostAccess(s)) > 0 || serviceAccountOf(s) != 'agent')",
        )
        .unwrap();
        let pod = serde_json::json!({"kind": "Pod", "spec": {"serviceAccountName": "agent",
            "containers": [{"name": "a", "envFrom": [{"secretRef": {"name": "db"}}]}]}});
        assert_eq!(c.eval(&inputs(pod, serde_json::Value::Null)), Outcome::True);
        let clean = serde_json::json!({"kind": "Pod", "spec": {"serviceAccountName": "agent", "containers": [{"name": "a"}]}});
        assert_eq!(
            c.eval(&inputs(clean, serde_json::Value::Null)),
            Outcome::False
        );
        let cm = serde_json::json!({"kind": "ConfigMap", "data": {"secretName": "x"}});
        assert_eq!(c.eval(&inputs(cm, serde_json::Value::Null)), Outcome::False);
    }

    #[test]
    fn bad_expressions_are_refused_at_load() {
        assert!(matches!(
            Condition::compile("x".into(), "object.spec.("),
            Err(ConditionError::Parse(_))
        ));
        assert!(matches!(
            Condition::compile("x".into(), "objet.spec.replicas == 0"),
            Err(ConditionError::Undeclared(n)) if n == "objet"
        ));
        assert!(matches!(
            Condition::compile("x".into(), "podSpecz(object).size() > 0"),
            Err(ConditionError::Undeclared(_))
        ));
        assert!(matches!(
            Condition::compile("x".into(), &"1 + ".repeat(2000)),
            Err(ConditionError::TooLong(_))
        ));
        // Non-bool results are errors at evaluation.
        let c = Condition::compile("x".into(), "1 + 1").unwrap();
        assert!(matches!(
            c.eval(&inputs(serde_json::json!({}), serde_json::json!({}))),
            Outcome::Error(_)
        ));
    }
}
