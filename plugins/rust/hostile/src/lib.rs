//! hostile: a filter that misbehaves on request, for the sandbox tests. The
//! application property `hostile` of a message says how:
//! `loop` (never returns), `alloc` (allocates without bound), `trap`
//! (panics, which aborts: a wasm trap), `huge` (returns an 8 MiB body),
//! `recurse` (overflows its stack), `log` (calls `host.log` with 1 KiB lines
//! in a loop, up to a million times or until its time limit stops it, then
//! passes the message), `topic-nul`, `topic-wildcard`, `topic-empty`,
//! `topic-long` (returns the message on a topic no broker takes: with a NUL,
//! with wildcards, empty, 70,000 bytes long). A message on a plain topic has
//! no properties: a body starting `hostile=<mode>` says the mode then. Any
//! other message passes unchanged.


wit_bindgen::generate!({ path: "../../../wit", world: "filter" });

struct Plugin;

/// How many lines the `log` mode writes (when its time limit allows).
const LOG_LINES: u32 = 1_000_000;

fn recurse(n: u64) -> u64 {
    let buf = std::hint::black_box([n; 64]);
    if n == u64::MAX {
        return buf[0];
    }
    recurse(n + 1) + buf[1]
}

impl Guest for Plugin {
    fn filter(m: Message) -> Option<Message> {
        let mode = m
            .properties
            .iter()
            .find(|(k, _)| k == "hostile")
            .map(|(_, v)| v.clone())
            .or_else(|| {
                let body = std::str::from_utf8(&m.body).ok()?;
                Some(body.strip_prefix("hostile=")?.split_whitespace().next()?.to_string())
            });
        match mode.as_deref() {
            Some("loop") => {
                let mut i: u64 = 0;
                loop {
                    i = std::hint::black_box(i.wrapping_add(1));
                }
            }
            Some("alloc") => {
                let mut hoard: Vec<Vec<u8>> = Vec::new();
                loop {
                    hoard.push(vec![1u8; 1 << 20]);
                    std::hint::black_box(&hoard);
                }
            }
            Some("trap") => panic!("hostile plugin was asked to trap"),
            Some("huge") => {
                let mut m = m;
                m.body = vec![b'x'; 8 << 20];
                Some(m)
            }
            Some("log") => {
                let line = "x".repeat(1024);
                for _ in 0..LOG_LINES {
                    edgehub::plugin::host::log(2, &line);
                }
                Some(m)
            }
            Some("recurse") => {
                std::hint::black_box(recurse(0));
                Some(m)
            }
            Some(bad) if bad.starts_with("topic-") => {
                let mut m = m;
                m.topic = match bad {
                    "topic-nul" => "plain/a\0b".to_string(),
                    "topic-wildcard" => "plain/+/#".to_string(),
                    "topic-empty" => String::new(),
                    _ => format!("plain/{}", "x".repeat(70_000)),
                };
                Some(m)
            }
            _ => Some(m),
        }
    }
}

export!(Plugin);
