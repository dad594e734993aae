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
pub struct Inputs<'a> {
    pub(super) object: Value,
    pub(super) old_object: Value,
    request: Lazy<'a>,
    /// Why `object` or `oldObject` is missing although a condition reads it.
    pub(super) missing: Option<String>,
}

/// The `request` variable, made on first use: most requests meet no rule with a
/// condition (reads never do under the shipped policy), and building it (a JSON
/// document of the attributes, the query, the user and the pod, converted to CEL)
/// was ~1.3% of a gated small GET's CPU.
struct Lazy<'a> {
    value: std::cell::OnceCell<Value>,
    make: Box<dyn Fn() -> Value + 'a>,
}

impl<'a> Inputs<'a> {
    pub(super) fn new(
        object: Value,
        old_object: Value,
        request: impl Fn() -> Value + 'a,
        missing: Option<String>,
    ) -> Self {
        Inputs {
            object,
            old_object,
            request: Lazy {
                value: std::cell::OnceCell::new(),
                make: Box::new(request),
            },
            missing,
        }
    }

    fn request(&self) -> Value {
        self.request
            .value
            .get_or_init(|| (self.request.make)())
            .clone()
    }

    /// Whether `request` was made (tests).
    #[cfg(test)]
    pub(super) fn request_made(&self) -> bool {
        self.request.value.get().is_some()
    }
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
    #[error("the expression nests {0} levels deep; the limit is {MAX_DEPTH}")]
    TooDeep(usize),
    #[error("the expression could not be compiled: {0}")]
    Compiler(String),
}

/// Longest expression accepted (Kubernetes allows 5120 characters per expression).
pub const MAX_EXPRESSION: usize = 5120;

/// Deepest expression tree accepted (operands of operands, arguments of calls, macro
/// bodies). Evaluating a condition recurses over its tree on the thread serving the
/// request; the conditions of the shipped policies are under 12 deep.
pub const MAX_DEPTH: usize = 32;

/// Stack of the thread a condition is compiled on. The CEL parser (ANTLR) and the
/// tree it builds recurse per nesting level and per operand of an operator chain,
/// before [`MAX_DEPTH`] can be checked: measured on 2 MiB, 25 nested parentheses or a
/// 75-term `1+1+...` overflowed a debug build's stack and a 2,500-term one a release
/// build's (the process aborts). The longest expression accepted needs at most
/// ~2,560 levels; the stack is reserved, and only what is used is committed.
const COMPILE_STACK: usize = 256 << 20;

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
        let source = expression.to_owned();
        std::thread::Builder::new()
            .name("cel-compile".into())
            .stack_size(COMPILE_STACK)
            .spawn(move || Condition::compile_here(name, &source))
            .map_err(|e| ConditionError::Compiler(format!("no thread to compile on: {e}")))?
            .join()
            .unwrap_or_else(|_| Err(ConditionError::Compiler("the CEL compiler panicked".into())))
    }

    /// [`Condition::compile`] on the current thread (one with room: see
    /// [`COMPILE_STACK`]); a tree deeper than [`MAX_DEPTH`] is refused (and dropped
    /// here, where dropping it cannot overflow either).
    fn compile_here(name: String, expression: &str) -> Result<Condition, ConditionError> {
        let program = env()
            .compile(expression)
            .map_err(|e| ConditionError::Parse(e.to_string().replace('\n', " ")))?;
        let depth = depth(program.expression());
        if depth > MAX_DEPTH {
            return Err(ConditionError::TooDeep(depth));
        }
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
        let probe = Inputs::new(Value::Null, Value::Null, || Value::Null, None);
        if let Err(ExecutionError::UndeclaredReference(n)) = c.run(&probe) {
            return Err(ConditionError::Undeclared(n.to_string()));
        }
        Ok(c)
    }

    fn run(&self, inputs: &Inputs) -> Result<Value, ExecutionError> {
        let mut ctx = Context::with_env(env());
        ctx.add_variable_from_value("object", inputs.object.clone());
        ctx.add_variable_from_value("oldObject", inputs.old_object.clone());
        ctx.add_variable_from_value("request", inputs.request());
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

/// The depth of an expression tree, without recursing.
fn depth(root: &cel::common::ast::IdedExpr) -> usize {
    use cel::common::ast::{EntryExpr, Expr};
    let mut deepest = 0;
    let mut stack = vec![(root, 1usize)];
    while let Some((e, d)) = stack.pop() {
        deepest = deepest.max(d);
        let mut push = |child| stack.push((child, d + 1));
        match &e.expr {
            Expr::Call(c) => {
                if let Some(t) = &c.target {
                    push(t);
                }
                c.args.iter().for_each(push);
            }
            Expr::Comprehension(c) => {
                for child in [
                    &c.iter_range,
                    &c.accu_init,
                    &c.loop_cond,
                    &c.loop_step,
                    &c.result,
                ] {
                    push(child);
                }
            }
            Expr::List(l) => l.elements.iter().for_each(push),
            Expr::Map(m) => {
                for entry in &m.entries {
                    if let EntryExpr::MapEntry(me) = &entry.expr {
                        push(&me.key);
                        push(&me.value);
                    }
                }
            }
            Expr::Struct(st) => {
                for entry in &st.entries {
                    match &entry.expr {
                        EntryExpr::StructField(f) => push(&f.value),
                        EntryExpr::MapEntry(me) => {
                            push(&me.key);
                            push(&me.value);
                        }
                    }
                }
            }
            Expr::Select(sel) => push(&sel.operand),
            Expr::Unspecified | Expr::Ident(_) | Expr::Literal(_) => {}
        }
    }
    deepest
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inputs(object: serde_json::Value, old: serde_json::Value) -> Inputs<'static> {
        Inputs::new(
            library::from_json(&object),
            library::from_json(&old),
            || library::from_json(&serde_json::json!({"operation": "UPDATE"})),
            None,
        )
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

    /// Expressions within the length limit whose nesting or operator chains would
    /// overflow a thread's stack in the parser (measured: 25 parentheses on a debug
    /// build's 2 MiB, a 2,500-term sum on a release build's) are refused with an
    /// error, never a crash; here on the test's own 2 MiB thread.
    #[test]
    fn deep_expressions_are_refused_not_overflowed() {
        let hostile = [
            vec!["1"; 2500].join("+"),
            format!("{}1{}", "(".repeat(2000), ")".repeat(2000)),
            format!("{}{}", "[".repeat(2500), "]".repeat(2500)),
            format!("{}1{}", "size(".repeat(850), ")".repeat(850)),
            format!("object{}.orValue(1) == 1", ".?a".repeat(1200)),
        ];
        for e in &hostile {
            assert!(e.len() <= MAX_EXPRESSION, "{}", e.len());
            let r = Condition::compile("x".into(), e);
            assert!(
                matches!(
                    r,
                    Err(ConditionError::TooDeep(_) | ConditionError::Parse(_))
                ),
                "{}...: {r:?}",
                &e[..40]
            );
        }
        // Within the limit: compiled, and evaluated on this thread.
        let ok = format!("{}true{}", "(".repeat(8), ")".repeat(8));
        let c = Condition::compile("x".into(), &ok).expect("8 parentheses");
        assert_eq!(
            c.eval(&inputs(serde_json::json!({}), serde_json::json!({}))),
            Outcome::True
        );
        let sum = format!("{} == 30", vec!["1"; 30].join("+"));
        let c = Condition::compile("x".into(), &sum).expect("a 30-term sum");
        assert_eq!(
            c.eval(&inputs(serde_json::json!({}), serde_json::json!({}))),
            Outcome::True
        );
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
