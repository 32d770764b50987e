//! The frames of a link as Rust data: the handshake maps and the messages
//! (docs/protocol.md, "Handshake" and "Messages"), over the value model of
//! [`super::value`]. The kernel builds these frames in Python; the tests
//! record the frames of real sessions and check every one here
//! (`cpy2py._host.check_frame`, tests/test_protocol_spec.py), so that the
//! code, this model and the spec cannot drift apart without a test failing.
//!
//! The checks are strict: a key, an operation or a field that the spec does
//! not list is refused, so anything new on the wire must be written down
//! here and in docs/protocol.md first.

use super::handshake::PROTOCOL_VERSION;
use super::header::{RAISE, RELEASE, REPLY, REQUEST, SHUTDOWN};
use super::value::{ClassInfo, Value};
use crate::error::{HostError, Result};

/// Where a frame comes in the life of a link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// The twin's first frame.
    Hello,
    /// The master's answer to the hello.
    Welcome,
    /// The twin's answer to the welcome: ready, or the error that stopped it.
    Answer,
    /// Every frame after the handshake.
    Message,
}

/// Which end of the link sent a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sender {
    Master,
    Twin,
}

/// Whether the twin is trusted (native) or sandboxed (a WASI guest).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Link {
    Trusted,
    Sandboxed,
}

/// The operations of a request (docs/protocol.md, "Operations").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// `callable, args, kwargs`
    Execute,
    /// `class, args, kwargs`
    Instantiate,
    /// `object, name`
    GetAttr,
    /// `object, name, value`
    SetAttr,
    /// `object, name`
    DelAttr,
    /// `object, name, args, kwargs`
    CallMethod,
}

impl Op {
    pub fn from_code(code: u64) -> Option<Op> {
        Some(match code {
            0 => Op::Execute,
            1 => Op::Instantiate,
            2 => Op::GetAttr,
            3 => Op::SetAttr,
            4 => Op::DelAttr,
            5 => Op::CallMethod,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Op::Execute => "execute",
            Op::Instantiate => "instantiate",
            Op::GetAttr => "getattr",
            Op::SetAttr => "setattr",
            Op::DelAttr => "delattr",
            Op::CallMethod => "call_method",
        }
    }
}

/// A call carried by the welcome: an initializer.
pub type SetupCall = (Value, Vec<Value>, Vec<(String, Value)>);

/// The `config` map of the welcome.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub app_paths: Vec<String>,
    pub site_paths: Vec<String>,
    /// `(main_path, main_name)`, absent when the master sends no main module
    pub main: Option<(Option<String>, Option<String>)>,
    pub run_main: bool,
    pub argv: Option<Vec<String>>,
    pub initializers: Vec<SetupCall>,
    /// source of `__main__` definitions the initializers use, from a master
    /// without a main file (a notebook): maps of name, filename, line,
    /// source, imports and constants
    pub main_definitions: Vec<Value>,
    /// in the welcome of a guest of a fresh twin: that twin's id (code
    /// pinned to it runs in this guest)
    pub fresh_of: Option<String>,
}

/// One frame of a link, checked against the spec.
#[derive(Debug, Clone, PartialEq)]
pub enum Frame {
    Hello {
        twin_id: String,
        implementation: String,
        version: String,
        executable: String,
        pid: u64,
    },
    Welcome {
        master_id: String,
        config: Config,
    },
    Ready,
    SetupFailed(String),
    Request {
        id: u64,
        chain: u64,
        op: Op,
        operands: Vec<Value>,
    },
    Reply {
        id: u64,
        value: Value,
    },
    Raise {
        id: u64,
        exception: Value,
    },
    /// `(owner, instance id, count)` of each released reference
    Release(Vec<(String, u64, u64)>),
    Shutdown {
        id: u64,
    },
}

impl Frame {
    /// A short name of the frame's kind (for tests that check which kinds a
    /// session sent): `hello`, `request execute`, `release`, ...
    pub fn kind(&self) -> String {
        match self {
            Frame::Hello { .. } => "hello".into(),
            Frame::Welcome { .. } => "welcome".into(),
            Frame::Ready => "ready".into(),
            Frame::SetupFailed(_) => "setup error".into(),
            Frame::Request { op, .. } => format!("request {}", op.name()),
            Frame::Reply { .. } => "reply".into(),
            Frame::Raise { .. } => "raise".into(),
            Frame::Release(_) => "release".into(),
            Frame::Shutdown { .. } => "shutdown".into(),
        }
    }
}

fn invalid(what: impl std::fmt::Display) -> HostError {
    HostError::Protocol(format!("not a frame of the cpy2py protocol: {what}"))
}

/// Checks one frame: the value model first (`Value::decode`), then the
/// layout that `stage`, `sender` and `link` call for.
pub fn check_frame(frame: &[u8], stage: Stage, sender: Sender, link: Link) -> Result<Frame> {
    let value = Value::decode(frame)?;
    check_link_rules(&value, link)?;
    match (stage, sender) {
        (Stage::Hello, Sender::Twin) => hello(value),
        (Stage::Welcome, Sender::Master) => welcome(value),
        (Stage::Answer, Sender::Twin) => answer(value),
        (Stage::Message, _) => message(value, sender),
        (stage, sender) => Err(invalid(format!(
            "a {stage:?} frame is never sent by the {sender:?}"
        ))),
    }
}

/// What a link allows anywhere in a frame: no pickle on a sandboxed link,
/// and a class description with methods (what a master granted its guest,
/// and the guest's references back to it) on sandboxed links only.
fn check_link_rules(value: &Value, link: Link) -> Result<()> {
    let mut stack = vec![value];
    while let Some(value) = stack.pop() {
        match value {
            Value::Pickle(_) if link == Link::Sandboxed => {
                return Err(invalid("a pickle on a sandboxed link"));
            }
            Value::TwinRef {
                class: ClassInfo::Described { methods: Some(_), .. },
                ..
            } if link == Link::Trusted => {
                return Err(invalid(
                    "a class description with methods (a grant) on a trusted link; only sandboxed links carry them",
                ));
            }
            Value::List(items) | Value::Tuple(items) | Value::Set(items) | Value::FrozenSet(items) => {
                stack.extend(items)
            }
            Value::Dict(entries) => stack.extend(entries.iter().flat_map(|(k, v)| [k, v])),
            Value::Exception { args, state, .. } => {
                stack.extend(args);
                stack.extend(state.iter().map(|(_, v)| v));
            }
            _ => {}
        }
    }
    Ok(())
}

/// The entries of a map whose keys must be exactly `required` plus any of
/// `optional`, in any order.
fn fields(value: Value, what: &str, required: &[&str], optional: &[&str]) -> Result<Vec<(String, Value)>> {
    let Value::Dict(entries) = value else {
        return Err(invalid(format!("the {what} is not a map")));
    };
    let mut out = Vec::with_capacity(entries.len());
    for (key, value) in entries {
        match key {
            Value::Str(key) if required.contains(&key.as_str()) || optional.contains(&key.as_str()) => {
                if out.iter().any(|(k, _)| *k == key) {
                    return Err(invalid(format!("the {what} has the key {key:?} twice")));
                }
                out.push((key, value));
            }
            other => return Err(invalid(format!("the {what} has the unknown key {other:?}"))),
        }
    }
    if let Some(missing) = required.iter().find(|k| !out.iter().any(|(key, _)| key == *k)) {
        return Err(invalid(format!("the {what} lacks the key {missing:?}")));
    }
    Ok(out)
}

fn take(fields: &mut Vec<(String, Value)>, key: &str) -> Option<Value> {
    let at = fields.iter().position(|(k, _)| k == key)?;
    Some(fields.swap_remove(at).1)
}

fn text(value: Option<Value>, what: &str) -> Result<String> {
    match value {
        Some(Value::Str(s)) => Ok(s),
        other => Err(invalid(format!("{what} must be a str, not {other:?}"))),
    }
}

fn optional_text(value: Option<Value>, what: &str) -> Result<Option<String>> {
    match value {
        Some(Value::None) | None => Ok(None),
        other => text(other, what).map(Some),
    }
}

fn uint(value: Option<Value>, what: &str) -> Result<u64> {
    match value {
        Some(Value::Int(n)) => u64::try_from(n).map_err(|_| invalid(format!("{what} {n} is negative"))),
        other => Err(invalid(format!("{what} must be an unsigned int, not {other:?}"))),
    }
}

fn texts(value: Option<Value>, what: &str) -> Result<Vec<String>> {
    match value {
        Some(Value::List(items)) => items.into_iter().map(|item| text(Some(item), what)).collect(),
        other => Err(invalid(format!("{what} must be a list of str, not {other:?}"))),
    }
}

fn version(value: Option<Value>) -> Result<()> {
    match value {
        Some(Value::Int(v)) if v == i128::from(PROTOCOL_VERSION) => Ok(()),
        other => Err(invalid(format!(
            "the protocol version must be {PROTOCOL_VERSION}, not {other:?}"
        ))),
    }
}

fn hello(value: Value) -> Result<Frame> {
    let keys = [
        "cpy2py",
        "twin_id",
        "implementation",
        "version",
        "executable",
        "pid",
    ];
    let mut f = fields(value, "hello", &keys, &["plain_blocks", "renditions"])?;
    version(take(&mut f, "cpy2py"))?;
    for flag in ["plain_blocks", "renditions"] {
        if let Some(said) = f.iter().find(|(k, _)| k == flag).map(|(_, v)| v) {
            if *said != Value::Bool(true) {
                return Err(invalid(format!("the hello's {flag} is {said:?}, not true")));
            }
        }
    }
    Ok(Frame::Hello {
        twin_id: text(take(&mut f, "twin_id"), "twin_id")?,
        implementation: text(take(&mut f, "implementation"), "implementation")?,
        version: text(take(&mut f, "version"), "version")?,
        executable: text(take(&mut f, "executable"), "executable")?,
        pid: uint(take(&mut f, "pid"), "pid")?,
    })
}

fn welcome(value: Value) -> Result<Frame> {
    let mut f = fields(value, "welcome", &["cpy2py", "master_id", "config"], &[])?;
    version(take(&mut f, "cpy2py"))?;
    let master_id = text(take(&mut f, "master_id"), "master_id")?;
    let required = ["app_paths", "site_paths", "run_main", "argv", "initializers"];
    let mut c = fields(
        take(&mut f, "config").expect("checked"),
        "welcome's config",
        &required,
        &["main_path", "main_name", "main_definitions", "fresh_of"],
    )?;
    let main = match (take(&mut c, "main_path"), take(&mut c, "main_name")) {
        (None, None) => None,
        (path @ Some(_), name @ Some(_)) => Some((
            optional_text(path, "main_path")?,
            optional_text(name, "main_name")?,
        )),
        _ => return Err(invalid("main_path and main_name come together")),
    };
    let run_main = match take(&mut c, "run_main") {
        Some(Value::Bool(b)) => b,
        other => return Err(invalid(format!("run_main must be a bool, not {other:?}"))),
    };
    let argv = match take(&mut c, "argv") {
        Some(Value::None) => None,
        other => Some(texts(other, "argv")?),
    };
    Ok(Frame::Welcome {
        master_id,
        config: Config {
            app_paths: texts(take(&mut c, "app_paths"), "app_paths")?,
            site_paths: texts(take(&mut c, "site_paths"), "site_paths")?,
            main,
            run_main,
            argv,
            initializers: setup_calls(take(&mut c, "initializers"), "initializers")?,
            main_definitions: main_definitions(take(&mut c, "main_definitions"))?,
            fresh_of: match take(&mut c, "fresh_of") {
                None => None,
                other => Some(text(other, "fresh_of")?),
            },
        },
    })
}

/// `[{name, filename, line, source, imports, constants}, ...]`, or absent.
fn main_definitions(value: Option<Value>) -> Result<Vec<Value>> {
    let Some(value) = value else {
        return Ok(Vec::new());
    };
    let Value::List(entries) = value else {
        return Err(invalid("main_definitions must be a list"));
    };
    let keys = ["name", "filename", "line", "source", "imports", "constants"];
    for entry in &entries {
        let mut f = fields(entry.clone(), "main definition", &keys, &[])?;
        text(take(&mut f, "name"), "a main definition's name")?;
        text(take(&mut f, "filename"), "a main definition's filename")?;
        uint(take(&mut f, "line"), "a main definition's line")?;
        text(take(&mut f, "source"), "a main definition's source")?;
        for map in ["imports", "constants"] {
            if !matches!(take(&mut f, map), Some(Value::Dict(_))) {
                return Err(invalid(format!("a main definition's {map} must be a map")));
            }
        }
    }
    Ok(entries)
}

/// `[[callable, args, kwargs], ...]`
fn setup_calls(value: Option<Value>, what: &str) -> Result<Vec<SetupCall>> {
    let Some(Value::List(calls)) = value else {
        return Err(invalid(format!("{what} must be a list")));
    };
    calls
        .into_iter()
        .map(|call| match call {
            Value::List(parts) => match <[Value; 3]>::try_from(parts) {
                Ok([callable, args, kwargs]) => Ok((callable, arguments(args)?, keywords(kwargs)?)),
                Err(_) => Err(invalid(format!(
                    "an entry of {what} must be [callable, args, kwargs]"
                ))),
            },
            _ => Err(invalid(format!(
                "an entry of {what} must be [callable, args, kwargs]"
            ))),
        })
        .collect()
}

fn answer(value: Value) -> Result<Frame> {
    let mut f = fields(value, "answer to the welcome", &[], &["ready", "error"])?;
    match (take(&mut f, "ready"), take(&mut f, "error")) {
        (Some(Value::Bool(true)), None) => Ok(Frame::Ready),
        (None, Some(Value::Str(traceback))) => Ok(Frame::SetupFailed(traceback)),
        _ => Err(invalid(
            "the answer to the welcome must be {\"ready\": true} or {\"error\": traceback text}",
        )),
    }
}

fn arguments(value: Value) -> Result<Vec<Value>> {
    match value {
        Value::List(args) => Ok(args),
        other => Err(invalid(format!(
            "positional arguments must be a list, not {other:?}"
        ))),
    }
}

fn keywords(value: Value) -> Result<Vec<(String, Value)>> {
    match value {
        Value::Dict(entries) => entries
            .into_iter()
            .map(|(k, v)| match k {
                Value::Str(k) => Ok((k, v)),
                other => Err(invalid(format!(
                    "a keyword argument's name must be a str, not {other:?}"
                ))),
            })
            .collect(),
        other => Err(invalid(format!("keyword arguments must be a map, not {other:?}"))),
    }
}

fn message(value: Value, sender: Sender) -> Result<Frame> {
    let Value::List(items) = value else {
        return Err(invalid("a message must be an array"));
    };
    let mut items = items.into_iter();
    let kind = uint(items.next(), "the message kind")?;
    let rest: Vec<Value> = items.collect();
    let arity = |n: usize, layout: &str| {
        if rest.len() == n {
            Ok(())
        } else {
            Err(invalid(format!(
                "a {layout} message has {} fields, not {}",
                n + 1,
                rest.len() + 1
            )))
        }
    };
    match kind {
        REQUEST => {
            if rest.len() < 3 {
                return Err(invalid("a request is [0, id, chain, op, operands...]"));
            }
            let mut rest = rest.into_iter();
            let id = uint(rest.next(), "the request id")?;
            let chain = uint(rest.next(), "the chain")?;
            let code = uint(rest.next(), "the operation")?;
            let op = Op::from_code(code).ok_or_else(|| invalid(format!("unknown operation {code}")))?;
            let operands: Vec<Value> = rest.collect();
            check_operands(op, &operands)?;
            Ok(Frame::Request {
                id,
                chain,
                op,
                operands,
            })
        }
        REPLY | RAISE => {
            arity(2, if kind == REPLY { "reply" } else { "raise" })?;
            let mut rest = rest.into_iter();
            let id = uint(rest.next(), "the request id")?;
            let value = rest.next().expect("two fields");
            if kind == REPLY {
                return Ok(Frame::Reply { id, value });
            }
            match value {
                exception @ Value::Exception { .. } => Ok(Frame::Raise { id, exception }),
                other => Err(invalid(format!(
                    "a raise carries an exception (tag 40010), not {other:?}"
                ))),
            }
        }
        RELEASE => {
            arity(1, "release")?;
            let Some(Value::List(entries)) = rest.into_iter().next() else {
                return Err(invalid("a release is [3, [[owner, instance id, count], ...]]"));
            };
            let released = entries
                .into_iter()
                .map(|entry| match entry {
                    Value::List(parts) => match <[Value; 3]>::try_from(parts) {
                        Ok([owner, iid, count]) => {
                            let count = uint(Some(count), "a released count")?;
                            if count == 0 {
                                return Err(invalid("a release of 0 references"));
                            }
                            Ok((
                                text(Some(owner), "an owner")?,
                                uint(Some(iid), "an instance id")?,
                                count,
                            ))
                        }
                        Err(_) => Err(invalid("a release entry is [owner, instance id, count]")),
                    },
                    _ => Err(invalid("a release entry is [owner, instance id, count]")),
                })
                .collect::<Result<_>>()?;
            Ok(Frame::Release(released))
        }
        SHUTDOWN => {
            arity(1, "shutdown")?;
            if sender != Sender::Master {
                return Err(invalid("only the master asks for a shutdown"));
            }
            Ok(Frame::Shutdown {
                id: uint(rest.into_iter().next(), "the request id")?,
            })
        }
        other => Err(invalid(format!("unknown message kind {other}"))),
    }
}

fn check_operands(op: Op, operands: &[Value]) -> Result<()> {
    let name = |value: &Value| match value {
        Value::Str(_) => Ok(()),
        other => Err(invalid(format!("an attribute name must be a str, not {other:?}"))),
    };
    let call = |args: &Value, kwargs: &Value| {
        arguments(args.clone())?;
        keywords(kwargs.clone()).map(|_| ())
    };
    match (op, operands) {
        (Op::Execute | Op::Instantiate, [_target, args, kwargs]) => call(args, kwargs),
        (Op::GetAttr | Op::DelAttr, [_object, attr]) => name(attr),
        (Op::SetAttr, [_object, attr, _value]) => name(attr),
        (Op::CallMethod, [_object, attr, args, kwargs]) => {
            name(attr)?;
            call(args, kwargs)
        }
        (op, operands) => Err(invalid(format!(
            "a {} request with {} operands",
            op.name(),
            operands.len()
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cbor(value: Value) -> Vec<u8> {
        value.encode().unwrap()
    }

    fn s(text: &str) -> Value {
        Value::Str(text.into())
    }

    fn list(items: Vec<Value>) -> Value {
        Value::List(items)
    }

    fn msg(frame: Value, sender: Sender) -> Result<Frame> {
        check_frame(&cbor(frame), Stage::Message, sender, Link::Trusted)
    }

    #[test]
    fn requests_of_every_operation() {
        let global = Value::Global(("m".into(), "f".into()));
        let call = vec![global.clone(), list(vec![]), Value::Dict(vec![])];
        for (code, operands) in [
            (0, call.clone()),
            (1, call.clone()),
            (2, vec![global.clone(), s("x")]),
            (3, vec![global.clone(), s("x"), Value::Int(1)]),
            (4, vec![global.clone(), s("x")]),
            (
                5,
                vec![
                    global.clone(),
                    s("m"),
                    list(vec![]),
                    Value::Dict(vec![(s("k"), Value::None)]),
                ],
            ),
        ] {
            let mut frame = vec![
                Value::Int(0),
                Value::Int(7),
                Value::Int(1 << 40),
                Value::Int(code),
            ];
            frame.extend(operands);
            let checked = msg(list(frame), Sender::Twin).unwrap();
            assert!(matches!(checked, Frame::Request { id: 7, .. }), "{checked:?}");
        }
        // wrong arity, unknown op, a keyword that is not a str
        assert!(msg(
            list(vec![
                Value::Int(0),
                Value::Int(1),
                Value::Int(1),
                Value::Int(2),
                global.clone()
            ]),
            Sender::Master
        )
        .is_err());
        assert!(msg(
            list(vec![Value::Int(0), Value::Int(1), Value::Int(1), Value::Int(9)]),
            Sender::Master
        )
        .is_err());
        let bad_kwargs = Value::Dict(vec![(Value::Int(1), Value::None)]);
        assert!(msg(
            list(vec![
                Value::Int(0),
                Value::Int(1),
                Value::Int(1),
                Value::Int(0),
                global,
                list(vec![]),
                bad_kwargs
            ]),
            Sender::Master
        )
        .is_err());
    }

    #[test]
    fn replies_raises_releases_and_shutdowns() {
        assert_eq!(
            msg(
                list(vec![Value::Int(1), Value::Int(3), Value::None]),
                Sender::Twin
            )
            .unwrap(),
            Frame::Reply {
                id: 3,
                value: Value::None
            }
        );
        let exception = Value::Exception {
            kind: ("builtins".into(), "ValueError".into()),
            args: vec![s("bad")],
            traceback: None,
            state: Vec::new(),
        };
        assert!(msg(list(vec![Value::Int(2), Value::Int(3), exception]), Sender::Twin).is_ok());
        assert!(msg(
            list(vec![Value::Int(2), Value::Int(3), s("not an exception")]),
            Sender::Twin
        )
        .is_err());
        let release = list(vec![
            Value::Int(3),
            list(vec![list(vec![s("pypy3"), Value::Int(5), Value::Int(2)])]),
        ]);
        assert_eq!(
            msg(release, Sender::Twin).unwrap(),
            Frame::Release(vec![("pypy3".into(), 5, 2)])
        );
        // the old layout, a list of instance ids, is refused
        assert!(msg(list(vec![Value::Int(3), list(vec![Value::Int(5)])]), Sender::Twin).is_err());
        assert!(msg(list(vec![Value::Int(4), Value::Int(9)]), Sender::Master).is_ok());
        assert!(msg(list(vec![Value::Int(4), Value::Int(9)]), Sender::Twin).is_err());
        assert!(msg(list(vec![Value::Int(5), Value::Int(9)]), Sender::Master).is_err());
    }

    #[test]
    fn handshake_maps_are_checked_key_by_key() {
        let ready = Value::Dict(vec![(s("ready"), Value::Bool(true))]);
        assert_eq!(
            check_frame(&cbor(ready.clone()), Stage::Answer, Sender::Twin, Link::Trusted).unwrap(),
            Frame::Ready
        );
        assert!(check_frame(&cbor(ready), Stage::Welcome, Sender::Master, Link::Trusted).is_err());
        let config = Value::Dict(vec![
            (s("app_paths"), list(vec![s("/app")])),
            (s("site_paths"), list(vec![])),
            (s("main_name"), Value::None),
            (s("main_path"), s("/app/main.py")),
            (s("run_main"), Value::Bool(false)),
            (s("argv"), Value::None),
            (s("initializers"), list(vec![])),
        ]);
        let welcome = |config: Value| {
            Value::Dict(vec![
                (s("cpy2py"), Value::Int(1)),
                (s("master_id"), s("master")),
                (s("config"), config),
            ])
        };
        let frame = check_frame(
            &cbor(welcome(config.clone())),
            Stage::Welcome,
            Sender::Master,
            Link::Trusted,
        )
        .unwrap();
        assert!(matches!(
            frame,
            Frame::Welcome {
                config: Config {
                    main: Some((Some(_), None)),
                    ..
                },
                ..
            }
        ));
        let Value::Dict(mut entries) = config else {
            unreachable!()
        };
        // a guest of a fresh twin is told that twin's id, as a str
        let with = |value: Value| {
            let mut more = entries.clone();
            more.push((s("fresh_of"), value));
            check_frame(
                &cbor(welcome(Value::Dict(more))),
                Stage::Welcome,
                Sender::Master,
                Link::Trusted,
            )
        };
        assert!(matches!(
            with(s("per-call")).unwrap(),
            Frame::Welcome { config: Config { fresh_of: Some(ref id), .. }, .. } if id == "per-call"
        ));
        assert!(with(Value::Int(3)).is_err());
        entries.push((s("debug"), Value::None)); // a key the spec does not list
        let err = check_frame(
            &cbor(welcome(Value::Dict(entries))),
            Stage::Welcome,
            Sender::Master,
            Link::Trusted,
        )
        .unwrap_err();
        assert!(err.to_string().contains("unknown key"), "{err}");
    }

    #[test]
    fn link_rules() {
        let granted = Value::TwinRef {
            owner: "master".into(),
            instance: 1,
            class: ClassInfo::Described {
                name: "app.Doc".into(),
                specials: vec![],
                methods: Some(vec!["title".into()]),
            },
        };
        let reply = list(vec![Value::Int(1), Value::Int(1), list(vec![granted])]);
        let check = |sender, link| check_frame(&cbor(reply.clone()), Stage::Message, sender, link);
        assert!(check(Sender::Master, Link::Sandboxed).is_ok());
        assert!(check(Sender::Twin, Link::Sandboxed).is_ok()); // the guest hands it back
        assert!(check(Sender::Master, Link::Trusted).is_err());
        assert!(check(Sender::Twin, Link::Trusted).is_err());
        let pickle = list(vec![Value::Int(1), Value::Int(1), Value::Pickle(vec![0x80])]);
        assert!(check_frame(&cbor(pickle.clone()), Stage::Message, Sender::Twin, Link::Trusted).is_ok());
        assert!(check_frame(&cbor(pickle), Stage::Message, Sender::Twin, Link::Sandboxed).is_err());
    }
}
