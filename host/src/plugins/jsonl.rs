//! Messages as JSON lines, and running a plugin over them without a hub
//! (`edgehub plugin test`).
//!
//! Input line: `{"source":…,"topic":…,"properties":{…},"systemProperties":{…},
//! "body":"text"|"bodyBase64":"…","enqueuedMs":N}` (every key optional).
//! Output line, one per input: `{"index":N,"result":"pass","message":{…}}`,
//! `{"index":N,"result":"drop"}`, `{"index":N,"result":"route","endpoints":[…]}`
//! or `{"index":N,"result":"error","error":"…"}`.

use std::collections::BTreeMap;
use std::io::{BufRead, Write};
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde::{Deserialize, Serialize};

use super::{CallFailure, Endpoint, Instance, Kind, Message, Plugin};
use crate::message::Message as HubMessage;

#[derive(Debug, thiserror::Error)]
pub enum JsonlError {
    #[error("line {line}: {message}")]
    Line { line: usize, message: String },
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

#[derive(Deserialize, Default)]
#[serde(default, rename_all = "camelCase", deny_unknown_fields)]
struct InMessage {
    source: String,
    topic: String,
    properties: Props,
    system_properties: Props,
    body: Option<String>,
    body_base64: Option<String>,
    enqueued_ms: u64,
}

/// Properties as an object, or as a list of pairs (to keep order or repeats).
#[derive(Deserialize)]
#[serde(untagged)]
enum Props {
    Map(BTreeMap<String, String>),
    Pairs(Vec<(String, String)>),
}

impl Default for Props {
    fn default() -> Self {
        Props::Pairs(Vec::new())
    }
}

impl Props {
    fn into_vec(self) -> Vec<(String, String)> {
        match self {
            Props::Map(m) => m.into_iter().collect(),
            Props::Pairs(p) => p,
        }
    }
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct OutMessage<'a> {
    source: &'a str,
    topic: &'a str,
    properties: BTreeMap<&'a str, &'a str>,
    system_properties: BTreeMap<&'a str, &'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    body: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    body_base64: Option<String>,
    enqueued_ms: u64,
}

#[derive(Serialize)]
struct OutLine<'a> {
    index: usize,
    result: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    message: Option<OutMessage<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    endpoints: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

/// Parses one input line.
pub fn parse_message(text: &str) -> Result<Message, String> {
    let m: InMessage = serde_json::from_str(text).map_err(|e| e.to_string())?;
    let body = match (m.body, m.body_base64) {
        (Some(_), Some(_)) => return Err("give body or bodyBase64, not both".into()),
        (Some(b), None) => b.into_bytes(),
        (None, Some(b)) => base64::engine::general_purpose::STANDARD
            .decode(b)
            .map_err(|e| format!("bodyBase64: {e}"))?,
        (None, None) => Vec::new(),
    };
    Ok(Message {
        source: m.source,
        topic: m.topic,
        properties: m.properties.into_vec(),
        system_properties: m.system_properties.into_vec(),
        body,
        enqueued_ms: m.enqueued_ms,
    })
}

fn out_message(m: &Message) -> OutMessage<'_> {
    fn map(p: &[(String, String)]) -> BTreeMap<&str, &str> {
        p.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect()
    }
    let text = std::str::from_utf8(&m.body).ok();
    OutMessage {
        source: &m.source,
        topic: &m.topic,
        properties: map(&m.properties),
        system_properties: map(&m.system_properties),
        body: text,
        body_base64: text
            .is_none()
            .then(|| base64::engine::general_purpose::STANDARD.encode(&m.body)),
        enqueued_ms: m.enqueued_ms,
    }
}

/// The text form of an endpoint, as in route sinks.
pub fn endpoint_text(e: &Endpoint) -> String {
    match e {
        Endpoint::Upstream => "$upstream".into(),
        Endpoint::ModuleInput((m, i)) => format!("BrokeredEndpoint(\"/modules/{m}/inputs/{i}\")"),
        Endpoint::Drop => "$drop".into(),
    }
}

/// What a run over a file found.
#[derive(Debug, Default, Clone, Copy)]
pub struct Summary {
    pub messages: usize,
    pub passed: usize,
    pub dropped: usize,
    pub routed: usize,
    pub failed: usize,
}

/// Runs the plugin once per message, writing one line each; a failed call
/// gets an error line and a fresh instance for the next message.
pub fn run(
    plugin: &Plugin,
    messages: &[Message],
    mut out: impl Write,
) -> Result<Summary, JsonlError> {
    let mut instance: Option<Instance> = None;
    let mut summary = Summary::default();
    for (index, m) in messages.iter().enumerate() {
        summary.messages += 1;
        let inst = match &mut instance {
            Some(i) => i,
            None => match plugin.instantiate() {
                Ok(i) => instance.insert(i),
                Err(e) => {
                    summary.failed += 1;
                    write_line(&mut out, index, Err(CallFailure::Start(e.to_string())))?;
                    continue;
                }
            },
        };
        let r = if plugin.kind == Kind::Router {
            inst.route(m).map(super::Outcome::Routed)
        } else {
            inst.filter(m).map(super::Outcome::Filtered)
        };
        match &r {
            Ok(super::Outcome::Filtered(Some(_))) => summary.passed += 1,
            Ok(super::Outcome::Filtered(None)) => summary.dropped += 1,
            Ok(super::Outcome::Routed(_)) => summary.routed += 1,
            Err(_) => {
                summary.failed += 1;
                instance = None;
            }
        }
        write_line(&mut out, index, r)?;
    }
    out.flush()?;
    Ok(summary)
}

/// Mean cost per message over `rounds` passes of `messages` through one
/// warm instance: one call per message, and (for a batch filter) one call
/// per pass.
pub fn bench(
    plugin: &Plugin,
    messages: &[Message],
    rounds: usize,
) -> Result<(Duration, Option<Duration>), CallFailure> {
    let mut inst = plugin
        .instantiate()
        .map_err(|e| CallFailure::Start(e.to_string()))?;
    let single = |inst: &mut Instance| -> Result<(), CallFailure> {
        match plugin.kind {
            Kind::Router => messages.iter().try_for_each(|m| inst.route(m).map(drop)),
            _ => messages.iter().try_for_each(|m| inst.filter(m).map(drop)),
        }
    };
    let per_message = |started: Instant| started.elapsed() / (rounds * messages.len()) as u32;
    single(&mut inst)?;
    let started = Instant::now();
    for _ in 0..rounds {
        single(&mut inst)?;
    }
    let one = per_message(started);
    let batched = match plugin.kind {
        Kind::BatchFilter => {
            inst.filter_batch(messages)?;
            let started = Instant::now();
            for _ in 0..rounds {
                inst.filter_batch(messages)?;
            }
            Some(per_message(started))
        }
        Kind::ViewFilter => {
            // The hub lends its own messages: made once, outside the clock.
            let mut lent: Vec<_> = messages.iter().cloned().map(HubMessage::from).collect();
            let mut call = |inst: &mut Instance| {
                let (back, r) = inst.filter_views(std::mem::take(&mut lent));
                lent = back;
                r.map(drop)
            };
            call(&mut inst)?;
            let started = Instant::now();
            for _ in 0..rounds {
                call(&mut inst)?;
            }
            Some(per_message(started))
        }
        _ => None,
    };
    Ok((one, batched))
}

/// Reads JSON lines (blank lines skipped) into messages.
pub fn read_messages(input: impl BufRead) -> Result<Vec<Message>, JsonlError> {
    let mut messages = Vec::new();
    for (n, line) in input.lines().enumerate() {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        messages.push(parse_message(&line).map_err(|message| JsonlError::Line {
            line: n + 1,
            message,
        })?);
    }
    Ok(messages)
}

fn write_line(
    out: &mut impl Write,
    index: usize,
    r: Result<super::Outcome, CallFailure>,
) -> std::io::Result<()> {
    let line = match &r {
        Ok(super::Outcome::Filtered(Some(m))) => OutLine {
            index,
            result: "pass",
            message: Some(out_message(m)),
            endpoints: None,
            error: None,
        },
        Ok(super::Outcome::Filtered(None)) => OutLine {
            index,
            result: "drop",
            message: None,
            endpoints: None,
            error: None,
        },
        Ok(super::Outcome::Routed(e)) => OutLine {
            index,
            result: "route",
            message: None,
            endpoints: Some(e.iter().map(endpoint_text).collect()),
            error: None,
        },
        Err(e) => OutLine {
            index,
            result: "error",
            message: None,
            endpoints: None,
            error: Some(e.to_string()),
        },
    };
    serde_json::to_writer(&mut *out, &line)?;
    out.write_all(b"\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn input_lines_accept_maps_pairs_and_base64() {
        let m = parse_message(
            r#"{"source":"/messages/devices/d","properties":[["b","1"],["a","2"]],"bodyBase64":"AAE="}"#,
        )
        .unwrap();
        assert_eq!(m.properties[0].0, "b");
        assert_eq!(m.body, vec![0, 1]);
        let m = parse_message(r#"{"properties":{"b":"1","a":"2"},"body":"x"}"#).unwrap();
        assert_eq!(m.properties[0].0, "a");
        assert_eq!(m.body, b"x");
    }

    #[test]
    fn bad_lines_are_refused_with_their_number() {
        let err = read_messages("{}\n\n{\"bogus\":1}\n".as_bytes()).unwrap_err();
        assert!(err.to_string().starts_with("line 3:"), "{err}");
        assert!(parse_message(r#"{"body":"a","bodyBase64":"YQ=="}"#).is_err());
    }

    #[test]
    fn output_keeps_key_order_and_sorts_properties() {
        let m = parse_message(r#"{"properties":[["b","1"],["a","2"]],"body":"x"}"#).unwrap();
        let mut out = Vec::new();
        write_line(&mut out, 3, Ok(super::super::Outcome::Filtered(Some(m)))).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(
            text.starts_with(r#"{"index":3,"result":"pass","message":{"source":"","topic":"","properties":{"a":"2","b":"1"}"#),
            "{text}"
        );
    }
}
