//! hostile: a filter that misbehaves on request, for the sandbox tests. The
//! application property `hostile` of a message says how:
//! `loop` (never returns), `alloc` (allocates without bound), `trap`
//! (panics, which aborts: a wasm trap), `huge` (returns an 8 MiB body),
//! `recurse` (overflows its stack). Any other message passes unchanged.


wit_bindgen::generate!({ path: "../../../wit", world: "filter" });

struct Plugin;

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
            .map(|(_, v)| v.clone());
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
            Some("recurse") => {
                std::hint::black_box(recurse(0));
                Some(m)
            }
            _ => Some(m),
        }
    }
}

export!(Plugin);
