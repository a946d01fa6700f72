//! hostile-view: a view filter that misbehaves on request, for the sandbox
//! tests. The application property `hostile` of a message says how: `past`
//! (reads a message past the batch it was lent), `short` (answers for one
//! message fewer than it was lent), `huge` (replaces the message with an
//! 8 MiB body), `topic-nul` (replaces it with one on a topic with a NUL).
//! Any other message is kept.

wit_bindgen::generate!({ path: "../../../wit", world: "view-filter" });

use edgehub::plugin::view;

struct Plugin;

impl Guest for Plugin {
    fn filter_views(count: u32) -> Vec<Verdict> {
        let mut verdicts = Vec::new();
        for i in 0..count {
            let verdict = match view::property(i, "hostile").as_deref() {
                Some("past") => {
                    let _ = view::body(count);
                    Verdict::Keep
                }
                Some("short") => return verdicts,
                Some("huge") => {
                    let mut m = view::to_message(i);
                    m.body = vec![b'x'; 8 << 20];
                    Verdict::Replace(m)
                }
                Some("topic-nul") => {
                    let mut m = view::to_message(i);
                    m.topic = "plain/\0".into();
                    Verdict::Replace(m)
                }
                _ => Verdict::Keep,
            };
            verdicts.push(verdict);
        }
        verdicts
    }
}

export!(Plugin);
