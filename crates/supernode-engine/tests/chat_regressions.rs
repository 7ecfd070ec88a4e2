//! Chat template failures found by fuzzing (`tests/fuzz.rs`, target `chat_template`).

use supernode_engine::chat::{ChatMessage, ChatTemplate};

/// Found by fuzzing: minijinja 2.24's reverse slicing of an empty sequence or string indexed
/// element 0, so `[::-1]` of an empty content or of `messages[1:]` with one message panicked
/// the request's thread (it was then caught and made the request's error). minijinja 3 slices
/// as Python does: empty in, empty out, and no panic.
#[test]
fn regression_reversed_empty_slices_render_as_in_python() {
    for src in [
        "{{ messages[0].content[::-1] }}",
        "{% for m in messages[1:][::-1] %}{{ m.role }}{% endfor %}",
    ] {
        let t = ChatTemplate::new(src, "", "").expect("compiles");
        let render = || t.render(&[ChatMessage::new("user", "")], true);
        let out = std::panic::catch_unwind(std::panic::AssertUnwindSafe(render));
        let out = out.unwrap_or_else(|_| panic!("{src}: the render panicked"));
        assert_eq!(out.expect("renders").0, "", "{src}");
    }
    // The same slices of non-empty sequences reverse them.
    let t = ChatTemplate::new("{{ messages[0].content[::-1] }}", "", "").expect("compiles");
    let (out, _) = t
        .render(&[ChatMessage::new("user", "ab")], true)
        .expect("renders");
    assert_eq!(out, "ba");
    let t = ChatTemplate::new(
        "{% for m in messages[1:][::-1] %}{{ m.content }}{% endfor %}",
        "",
        "",
    )
    .expect("compiles");
    let msgs = [
        ChatMessage::new("system", "s"),
        ChatMessage::new("user", "u"),
        ChatMessage::new("assistant", "a"),
    ];
    assert_eq!(t.render(&msgs, true).expect("renders").0, "au");
}

/// Found by fuzzing (open; `chat.rs` sets no fuel): a template's loops are not bounded, so a
/// model file can make every request spin (10^10 iterations here). A render must end, with an
/// error, in bounded time.
#[test]
fn regression_template_loops_are_bounded() {
    let src = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}";
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let t = ChatTemplate::new(src, "", "").expect("compiles");
        let _ = tx.send(t.render(&[ChatMessage::new("user", "x")], true).is_ok());
    });
    let done = rx.recv_timeout(std::time::Duration::from_secs(20));
    assert_eq!(done, Ok(false), "the render did not fail within 20 s");
}

/// Found by fuzzing (open; `chat.rs`): nothing bounds what a render allocates, and fuel counts
/// instructions, not bytes. The first template (60 bytes) renders 3 GB in 30 instructions, and
/// the prompt path renders it three times (14.7 GB resident measured); with `range(300)` it
/// exhausts any server. `tojson(indent=10**8)` writes 600 MB per message. A render must fail
/// once its output passes a bound. The renders run in a child process under `ulimit -v`, so
/// that today's failure is an abort there, not an exhausted machine here.
#[test]
fn regression_render_memory_is_bounded() {
    if std::env::var_os("SUPERNODE_RENDER_MEMORY_CHILD").is_some() {
        for src in [
            "{% for i in range(30) %}{{ 'x' * 100000000 }}{% endfor %}",
            "{{ messages | tojson(indent=100000000) }}",
        ] {
            let t = ChatTemplate::new(src, "", "").expect("compiles");
            let out = t.render(&[ChatMessage::new("user", "x")], true);
            assert!(
                out.is_err(),
                "{src}: rendered {} bytes",
                out.map_or(0, |o| o.0.len())
            );
        }
        return;
    }
    let status = std::process::Command::new("sh")
        .arg("-c")
        .arg("ulimit -v 1500000 && exec \"$0\" --exact regression_render_memory_is_bounded")
        .arg(std::env::current_exe().expect("the test binary"))
        .env("SUPERNODE_RENDER_MEMORY_CHILD", "1")
        .status()
        .expect("runs the test binary");
    assert!(
        status.success(),
        "a render ran out of 1.5 GB of address space or was not refused ({status})"
    );
}
