//! `run --chat` without `--prompt`, driven through piped stdin with the real SmolLM2 model at
//! temperature 0: the commands, `/clear` forgetting the conversation, and replies that are not
//! cut at a fixed token count.

mod common;

use std::io::{Read, Write};
use std::process::{Command, Output, Stdio};

fn chat(input: &str, extra: &[&str]) -> Output {
    let model = common::model_path("smollm2-135m");
    let mut child = Command::new(env!("CARGO_BIN_EXE_supernode"))
        .args([
            "run",
            "--chat",
            "--temperature",
            "0",
            "--threads",
            "2",
            "--model",
        ])
        .arg(&model)
        .args(extra)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the binary runs");
    child
        .stdin
        .take()
        .expect("piped stdin")
        .write_all(input.as_bytes())
        .expect("write stdin");
    let out = child.wait_with_output().expect("the chat ends");
    assert!(
        out.status.success(),
        "chat failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn clear_forgets_the_conversation() {
    let n = ["-n", "24"];
    let fresh = stdout(&chat("What is my name?\n", &n));
    let cleared = stdout(&chat(
        "Hi! My name is Bob and I love sailing.\n/clear\nWhat is my name?\n",
        &n,
    ));
    let kept = stdout(&chat(
        "Hi! My name is Bob and I love sailing.\nWhat is my name?\n",
        &n,
    ));
    assert!(!fresh.trim().is_empty());
    // After /clear the question is answered as in a new chat; without it, differently.
    assert!(cleared.ends_with(&fresh), "{cleared:?} vs {fresh:?}");
    assert_ne!(cleared, kept);
}

#[test]
fn bye_ends_the_session_and_help_answers_without_generating() {
    let n = ["-n", "8"];
    let one = chat("Hello\n", &n);
    let bye = chat("Hello\n/bye\nAre you still there?\n", &n);
    assert_eq!(stdout(&bye), stdout(&one));
    let help = chat("/help\n/nonsense\n\n", &n);
    assert_eq!(stdout(&help), "");
    let err = stderr(&help);
    assert!(err.contains("/bye") && err.contains("/clear"), "{err}");
    assert!(err.contains("unknown command /nonsense"), "{err}");
}

/// The count in the `-v` status line "generated N tokens".
fn generated(err: &str) -> usize {
    let at = err.find("generated ").expect("a -v status line") + "generated ".len();
    err[at..]
        .split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .expect("a token count")
}

#[test]
fn a_reply_runs_to_the_context_unless_max_tokens_caps_it() {
    let args = ["--ctx", "256", "--ignore-eos", "-v"];
    let long = chat("Tell me a long story about the sea.\n", &args);
    let err = stderr(&long);
    assert!(generated(&err) > 128, "{err}");
    assert!(err.contains("the context of 256 tokens is full"), "{err}");

    let capped = chat(
        "Tell me a long story about the sea.\n",
        &[&args[..], &["-n", "40"]].concat(),
    );
    let err = stderr(&capped);
    assert_eq!(generated(&err), 40, "{err}");
    assert!(err.contains("cut at --max-tokens 40"), "{err}");
}

#[test]
fn ctrl_c_stops_the_reply_and_the_session_goes_on() {
    let model = common::model_path("smollm2-135m");
    let mut child = Command::new(env!("CARGO_BIN_EXE_supernode"))
        .args(["run", "--chat", "--temperature", "0", "--threads", "2"])
        .args(["--ignore-eos", "--ctx", "4096", "--model"])
        .arg(&model)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the binary runs");
    let mut stdin = child.stdin.take().expect("piped stdin");
    stdin
        .write_all(b"Tell me a long story about the sea.\n")
        .expect("write stdin");
    // Wait for the reply to start, then press "Ctrl-C".
    let mut stdout = child.stdout.take().expect("piped stdout");
    let mut first = [0u8; 1];
    stdout.read_exact(&mut first).expect("the reply starts");
    let kill = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .expect("kill runs");
    assert!(kill.success());
    stdin.write_all(b"/help\n").expect("write stdin");
    drop(stdin);
    let mut rest = String::new();
    stdout.read_to_string(&mut rest).expect("read stdout");
    let out = child.wait_with_output().expect("the chat ends");
    let err = stderr(&out);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("(reply stopped)"), "{err}");
    // The session read the next line after the stopped reply.
    assert!(err.contains("/clear forgets"), "{err}");
}
