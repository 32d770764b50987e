//! The real guest component (wasm/build/cpy2py-guest.wasm) in the host's
//! runner, without Python on the master side: handshake, a call, and each
//! limit ending the guest with its reason. Skipped (with a note) when the
//! guest has not been built; `just test` builds it first.

#[path = "support/repo.rs"]
mod repo;

use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use ciborium::value::Value;
use cpy2py_host::protocol::frame;
use cpy2py_host::wasm::ledger::Violation;
use cpy2py_host::wasm::output::{MemorySink, Which};
use cpy2py_host::wasm::queue::Popped;
use cpy2py_host::wasm::relay::{relay_holding, RelayEnd, MAX_UNSENT};
use cpy2py_host::wasm::{GuestConfig, GuestEnd, WasiGuest};

fn guest_config(twin_id: &str) -> Option<GuestConfig> {
    let build = repo::repo_root().join("wasm/build");
    let guest = build.join("cpy2py-guest.wasm");
    if !guest.exists() {
        eprintln!("skipped: {} is not built (run `just wasm`)", guest.display());
        return None;
    }
    let mut config = GuestConfig::new(twin_id, guest, build.join("python-lib"));
    config.bundled_dir = Some(build.join("bundled"));
    Some(config)
}

fn cbor(value: &Value) -> Vec<u8> {
    let mut out = Vec::new();
    ciborium::into_writer(value, &mut out).unwrap();
    out
}

fn decode(frame: &[u8]) -> Value {
    ciborium::from_reader(frame).unwrap()
}

fn text(s: &str) -> Value {
    Value::Text(s.into())
}

/// The reply `[1, id, value]` to request `id` (docs/protocol.md).
fn reply_to(id: u64, value: Value) -> Value {
    Value::Array(vec![Value::Integer(1.into()), Value::Integer(id.into()), value])
}

fn recv(guest: &WasiGuest) -> Option<Value> {
    match guest.recv(Some(Duration::from_secs(60))) {
        Popped::Frame(frame) => Some(decode(&frame)),
        Popped::Closed => None,
        Popped::TimedOut => panic!("the guest did not answer within 60 s"),
    }
}

/// Starts a guest and completes the handshake.
fn start(config: GuestConfig) -> (WasiGuest, MemorySink) {
    let sink = MemorySink::default();
    let guest = WasiGuest::start(config, Box::new(sink.clone())).unwrap();
    assert_eq!(guest.hello.implementation, "cpython");
    assert_eq!(guest.hello.executable, "wasi-python");
    let config = Value::Map(vec![(text("run_main"), Value::Bool(false))]);
    let welcome = Value::Map(vec![
        (text("cpy2py"), Value::Integer(1.into())),
        (text("master_id"), text("__master__")),
        (text("config"), config),
    ]);
    guest.send(cbor(&welcome)).unwrap();
    let ready = recv(&guest).expect("ready");
    assert_eq!(ready, Value::Map(vec![(text("ready"), Value::Bool(true))]));
    (guest, sink)
}

/// A call of `module.name(*args)` in the guest, as request `id` on chain 7.
fn call_request(id: u64, module: &str, name: &str, args: Vec<Value>) -> Vec<u8> {
    let func = Value::Tag(40011, Box::new(Value::Array(vec![text(module), text(name)])));
    cbor(&Value::Array(vec![
        Value::Integer(0.into()),
        Value::Integer(id.into()),
        Value::Integer(7.into()),
        Value::Integer(0.into()),
        func,
        Value::Array(args),
        Value::Map(vec![]),
    ]))
}

/// `builtins.eval(code)` in the guest, as request `id`.
fn eval_request(id: u64, code: &str) -> Vec<u8> {
    call_request(id, "builtins", "eval", vec![text(code)])
}

#[test]
fn the_guest_answers_calls_and_its_output_is_marked() {
    let Some(config) = guest_config("rust-box") else {
        return;
    };
    let (guest, sink) = start(config);
    guest.send(eval_request(1, "6 * 7")).unwrap();
    let reply = recv(&guest).unwrap();
    assert_eq!(reply, reply_to(1, Value::Integer(42.into())));
    guest.send(eval_request(2, "print('out there')")).unwrap();
    recv(&guest).unwrap();
    let lines = sink.0.lock().unwrap().clone();
    assert!(
        lines.contains(&(Which::Stdout, "[rust-box] out there\n".into())),
        "{lines:?}"
    );
    assert!(guest.end().is_none());
    assert_eq!(guest.kill(), GuestEnd::Killed);
    assert!(recv(&guest).is_none());
}

#[test]
fn a_runaway_call_is_stopped_at_its_timeout() {
    let Some(mut config) = guest_config("rust-timeout") else {
        return;
    };
    config.timeout = Some(Duration::from_millis(300));
    let (guest, _) = start(config);
    std::thread::sleep(Duration::from_millis(500)); // waiting for the master is free
    guest.send(eval_request(1, "1 + 1")).unwrap();
    assert!(recv(&guest).is_some());
    let started = Instant::now();
    guest.send(eval_request(2, "exec('while True: pass')")).unwrap();
    assert!(recv(&guest).is_none(), "the guest must be stopped, not answer");
    let elapsed = started.elapsed();
    assert_eq!(guest.end(), Some(GuestEnd::Timeout(Duration::from_millis(300))));
    assert!(elapsed < Duration::from_secs(5), "{elapsed:?}");
    assert!(guest.send(eval_request(3, "1")).is_err());
}

#[test]
fn a_guest_blocked_in_the_host_is_stopped_at_its_timeout() {
    let Some(mut config) = guest_config("rust-sleep") else {
        return;
    };
    config.timeout = Some(Duration::from_millis(300));
    let (guest, _) = start(config);
    let started = Instant::now();
    guest
        .send(eval_request(1, "__import__('time').sleep(30)"))
        .unwrap();
    assert!(recv(&guest).is_none());
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    assert!(matches!(guest.end(), Some(GuestEnd::Timeout(_))));
}

#[test]
fn memory_beyond_the_limit_stops_the_guest() {
    let Some(mut config) = guest_config("rust-memory") else {
        return;
    };
    config.memory_limit = 160 << 20;
    let (guest, _) = start(config);
    guest.send(eval_request(1, "len(bytearray(400 << 20))")).unwrap();
    assert!(recv(&guest).is_none());
    match guest.end() {
        Some(GuestEnd::Memory { limit, wanted }) => {
            assert_eq!(limit, 160 << 20);
            assert!(wanted > limit);
        }
        other => panic!("expected a memory end, got {other:?}"),
    }
}

#[test]
fn a_memory_limit_below_the_start_is_a_start_error() {
    let Some(mut config) = guest_config("rust-tiny") else {
        return;
    };
    config.memory_limit = 1 << 20;
    let err = WasiGuest::start(config, Box::new(MemorySink::default()))
        .err()
        .expect("the guest cannot start in 1 MiB")
        .to_string();
    assert!(err.contains("memory_limit"), "{err}");
}

#[test]
fn an_oversized_frame_stops_the_guest() {
    let Some(mut config) = guest_config("rust-frame") else {
        return;
    };
    config.max_frame = 1 << 20;
    let (guest, _) = start(config);
    guest.send(eval_request(1, "b'x' * (2 << 20)")).unwrap();
    assert!(recv(&guest).is_none());
    assert!(matches!(guest.end(), Some(GuestEnd::FrameTooBig { cap, .. }) if cap == 1 << 20));
}

/// Whether the guest printed a line containing `text`.
fn printed(sink: &MemorySink, text: &str) -> bool {
    sink.0.lock().unwrap().iter().any(|(_, line)| line.contains(text))
}

#[test]
fn a_guest_nobody_drives_does_nothing_until_a_thread_reads() {
    let Some(config) = guest_config("rust-idle") else {
        return;
    };
    let (guest, sink) = start(config);
    guest.send(eval_request(1, "print('it ran') or 42")).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        !printed(&sink, "it ran"),
        "the guest ran with no thread reading from it"
    );
    let reply = recv(&guest).unwrap();
    assert!(printed(&sink, "it ran"));
    assert_eq!(reply, reply_to(1, Value::Integer(42.into())));
}

#[test]
fn the_sender_can_carry_out_its_request_and_the_reply_waits_for_it() {
    let Some(config) = guest_config("rust-sender") else {
        return;
    };
    let (guest, _) = start(config);
    guest.send(eval_request(1, "6 * 7")).unwrap();
    assert!(guest.run_queued(Instant::now() + Duration::from_secs(60)));
    // no thread runs the guest now: the reply is simply there
    match guest.try_recv() {
        Popped::Frame(frame) => assert_eq!(decode(&frame), reply_to(1, Value::Integer(42.into()))),
        other => panic!("no reply after the request was carried out: {other:?}"),
    }
}

#[test]
fn a_driver_hands_over_what_the_guest_sent_before_it_serves_the_next_request() {
    let Some(config) = guest_config("rust-handover") else {
        return;
    };
    let (guest, sink) = start(config);
    guest.send(eval_request(1, "print('first') or 1")).unwrap();
    guest.send(eval_request(2, "print('second') or 2")).unwrap();
    let first = recv(&guest).unwrap();
    assert_eq!(first, reply_to(1, Value::Integer(1.into())));
    assert!(printed(&sink, "first"));
    assert!(
        !printed(&sink, "second"),
        "the reply waited while the guest served the next request"
    );
    let second = recv(&guest).unwrap();
    assert_eq!(second, reply_to(2, Value::Integer(2.into())));
}

#[test]
fn time_nobody_drives_the_guest_is_not_charged() {
    let Some(mut config) = guest_config("rust-undriven") else {
        return;
    };
    config.timeout = Some(Duration::from_millis(500));
    let (guest, _) = start(config);
    guest
        .send(exec_request(
            1,
            "import time\nend = time.monotonic() + 0.3\nwhile time.monotonic() < end: pass",
        ))
        .unwrap();
    // driven for a slice, then left alone mid-call far longer than the timeout
    assert_eq!(guest.recv(Some(Duration::from_millis(100))), Popped::TimedOut);
    std::thread::sleep(Duration::from_millis(1000));
    assert!(recv(&guest).is_some(), "the call is answered: {:?}", guest.end());
    assert_eq!(guest.end(), None);
}

#[test]
fn a_guest_is_stopped_from_another_thread_while_one_drives_it() {
    let Some(mut config) = guest_config("rust-kill-driven") else {
        return;
    };
    config.timeout = None;
    let (guest, _) = start(config);
    guest.send(exec_request(1, "while True: pass")).unwrap();
    std::thread::scope(|s| {
        s.spawn(|| {
            std::thread::sleep(Duration::from_millis(300));
            assert_eq!(guest.kill(), GuestEnd::Killed);
        });
        let started = Instant::now();
        assert!(recv(&guest).is_none(), "the guest must be stopped");
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{:?}",
            started.elapsed()
        );
    });
    assert_eq!(guest.end(), Some(GuestEnd::Killed));
    assert!(guest.send(eval_request(2, "1")).is_err());
}

#[test]
fn a_shutdown_is_carried_out_by_the_thread_that_waits_for_the_end() {
    let Some(config) = guest_config("rust-shutdown") else {
        return;
    };
    let (guest, _) = start(config);
    guest
        .send(cbor(&Value::Array(vec![
            Value::Integer(4.into()),
            Value::Integer(9.into()),
        ])))
        .unwrap();
    assert_eq!(guest.wait(Duration::from_secs(30)), Some(GuestEnd::Exited(0)));
    // its answer to the shutdown was left for the reader
    let answer = recv(&guest).expect("the answer to the shutdown");
    assert_eq!(answer, reply_to(9, Value::Null));
    assert!(recv(&guest).is_none());
}

/// `exec(code)` in the guest, as request `id` on chain 7.
fn exec_request(id: u64, code: &str) -> Vec<u8> {
    eval_request(id, &format!("exec({code:?})"))
}

/// Python code that uses the link directly: `link.recv()`, and
/// `send_frame` (the guest's frames go out on its stdout: wasm/wit/world.wit).
const LINK: &str = "from wit_world.imports import link\nfrom cpy2py.protocol import codec_py\n\
                    from cpy2py.kernel.guest_main import send_frame\n";

#[test]
fn a_guest_waiting_on_its_link_while_it_owes_an_answer_is_stopped() {
    let Some(config) = guest_config("rust-recv") else {
        return;
    };
    let (guest, _) = start(config);
    guest
        .send(exec_request(3, &format!("{LINK}link.recv()")))
        .unwrap();
    assert!(recv(&guest).is_none(), "the guest must be stopped, not wait");
    assert_eq!(
        guest.end(),
        Some(GuestEnd::Broke(Violation::WaitedWhileOwing { id: 3 }))
    );
}

#[test]
fn a_request_outside_every_call_stops_the_guest_before_the_master_sees_it() {
    let Some(config) = guest_config("rust-chain") else {
        return;
    };
    let (guest, _) = start(config);
    // the call is on chain 7; the guest asks on chain 999
    let code = format!("{LINK}send_frame(codec_py.dumps([0, 5, 999, 0, None, [], {{}}]))");
    guest.send(exec_request(1, &code)).unwrap();
    assert!(recv(&guest).is_none(), "nothing reaches the master");
    assert_eq!(
        guest.end(),
        Some(GuestEnd::Broke(Violation::RequestOutsideCall { chain: 999 }))
    );
}

/// Python code: `rounds` times, work `seconds` of guest time, then call the
/// master back on the call's chain (7) and take its answer from the link.
fn call_back_code(rounds: u32, seconds: f64) -> String {
    format!(
        "{LINK}import time\nfor i in range({rounds}):\n    end = time.monotonic() + {seconds}\n    \
         while time.monotonic() < end: pass\n    \
         send_frame(codec_py.dumps([0, 100 + i, 7, 0, None, [], {{}}]))\n    link.recv()\n"
    )
}

/// Answers the guest's callbacks after `master_time` each; the callbacks
/// answered and the guest's last frame that was not a callback.
fn serve_callbacks(guest: &WasiGuest, master_time: Duration) -> (usize, Option<Vec<Value>>) {
    let mut callbacks = 0;
    while let Some(frame) = recv(guest) {
        let Value::Array(items) = frame else {
            panic!("not a message: {frame:?}")
        };
        if items[0] != Value::Integer(0.into()) {
            return (callbacks, Some(items));
        }
        callbacks += 1;
        std::thread::sleep(master_time);
        let answer = Value::Array(vec![Value::Integer(1.into()), items[1].clone(), Value::Null]);
        if guest.send(cbor(&answer)).is_err() {
            break;
        }
    }
    (callbacks, None)
}

#[test]
fn callbacks_do_not_reset_the_timeout() {
    let Some(mut config) = guest_config("rust-callbacks") else {
        return;
    };
    config.timeout = Some(Duration::from_millis(500));
    let (guest, _) = start(config);
    guest.send(exec_request(1, &call_back_code(20, 0.2))).unwrap();
    let (callbacks, last) = serve_callbacks(&guest, Duration::from_millis(50));
    assert_eq!(last, None, "the call must not complete");
    assert_eq!(guest.end(), Some(GuestEnd::Timeout(Duration::from_millis(500))));
    // 0.5 s of guest time allows two rounds of 0.2 s, far fewer than all 20
    assert!((1..20).contains(&callbacks), "{callbacks} callbacks");
}

#[test]
fn time_the_master_spends_on_callbacks_is_not_the_guests() {
    let Some(mut config) = guest_config("rust-slow-master") else {
        return;
    };
    config.timeout = Some(Duration::from_millis(500));
    let (guest, _) = start(config);
    // five callbacks of 0.25 s of master time each: 1.25 s, over the timeout
    guest.send(exec_request(1, &call_back_code(5, 0.01))).unwrap();
    let (callbacks, last) = serve_callbacks(&guest, Duration::from_millis(250));
    assert_eq!(callbacks, 5);
    let last = last.expect("the guest answers its call");
    assert_eq!(last[..2], [Value::Integer(1.into()), Value::Integer(1.into())]);
    assert_eq!(guest.end(), None);
}

#[test]
#[ignore = "a measurement, not a test: cargo test --release --test wasi_guest -- --ignored --nocapture"]
fn round_trip_latency_without_python_in_the_master() {
    let Some(config) = guest_config("rust-latency") else {
        return;
    };
    let (guest, _) = start(config);
    let request = |id: u64| call_request(id, "builtins", "abs", vec![Value::Integer(1.into())]);
    let mut times = Vec::new();
    for id in 0..3000u64 {
        let frame = request(id);
        let started = Instant::now();
        guest.send(frame).unwrap();
        match guest.recv(None) {
            Popped::Frame(_) => {}
            other => panic!("{other:?}"),
        }
        times.push(started.elapsed());
    }
    times.sort();
    eprintln!("guest round trip: median {:?}, p10 {:?}", times[1500], times[300]);
}

#[test]
#[ignore = "a measurement, not a test: cargo test --release --test wasi_guest -- --ignored --nocapture"]
fn first_load_costs() {
    use cpy2py_host::wasm::runtime;
    let Some(config) = guest_config("rust-load") else {
        return;
    };
    let t = Instant::now();
    let bytes = std::fs::read(&config.guest_file).unwrap();
    let read = t.elapsed();
    let rt = runtime::runtime().unwrap();
    let t = Instant::now();
    let key = runtime::cache_key(&bytes, &rt.engine);
    let hash = t.elapsed();
    let t = Instant::now();
    rt.load_guest(&config.guest_file, &config.cache_dir.join("wasm"))
        .unwrap();
    let load = t.elapsed();
    eprintln!("read {read:?}, hash {hash:?} ({key}), load incl. read+hash+deserialize+link {load:?}");
}

#[test]
fn a_guest_that_writes_frames_faster_than_they_are_read_is_held_back() {
    let Some(config) = guest_config("rust-held-back") else {
        return;
    };
    let (guest, sink) = start(config);
    // 80 frames of 1 MiB (not protocol messages: the ledger lets them pass,
    // and there is no master here to refuse them), then a line
    let code = "from cpy2py.kernel.guest_main import send_frame\n\
                for _ in range(80):\n    send_frame(b'x' * (1 << 20))\n\
                print('sent all')";
    guest.send(exec_request(1, code)).unwrap();
    assert!(guest.drive(Instant::now() + Duration::from_secs(60)));
    let mut queued = 0;
    while let Popped::Frame(frame) = guest.try_recv() {
        assert_eq!(frame.len(), 1 << 20);
        queued += 1;
    }
    assert_eq!(queued, 64, "the guest stops at 64 MiB unread (MAX_QUEUED_BYTES)");
    assert!(!printed(&sink, "sent all"), "the guest went on past a full queue");
    assert!(
        guest.end().is_none(),
        "waiting for the master is no fault of the guest"
    );
    let mut rest = 0;
    let reply = loop {
        match guest.recv(Some(Duration::from_secs(60))) {
            Popped::Frame(frame) if frame.len() == 1 << 20 => rest += 1,
            Popped::Frame(frame) => break decode(&frame),
            other => panic!("the guest did not go on: {other:?}"),
        }
    };
    assert_eq!(queued + rest, 80);
    assert!(printed(&sink, "sent all"));
    assert_eq!(reply, reply_to(1, Value::Null));
}

/// A shutdown request `[4, id]`.
fn shutdown_request(id: u64) -> Vec<u8> {
    cbor(&Value::Array(vec![
        Value::Integer(4.into()),
        Value::Integer(id.into()),
    ]))
}

/// Runs `talk` as the master, over a socket pair, with a guest that the
/// relay (wasm/relay.rs) serves and a thread that waits for the guest's end
/// beside it, as in the guest's host process (cpy2py/ray_sandbox.py); how
/// the relay and the guest ended. The master's end stays open while the
/// relay runs if `talk` gives it back; dropped (as a failed assertion in
/// `talk` drops it), it ends the relay. None when the guest is not built.
fn relayed(
    twin_id: &str,
    talk: impl FnOnce(UnixStream) -> Option<UnixStream> + Send,
) -> Option<(RelayEnd, Option<GuestEnd>)> {
    relayed_holding(twin_id, MAX_UNSENT, talk)
}

/// `relayed`, with a relay that waits for its writer past `max_unsent`
/// queued bytes.
fn relayed_holding(
    twin_id: &str,
    max_unsent: usize,
    talk: impl FnOnce(UnixStream) -> Option<UnixStream> + Send,
) -> Option<(RelayEnd, Option<GuestEnd>)> {
    let (guest, _) = start(guest_config(twin_id)?);
    let (master, node) = UnixStream::pair().unwrap();
    // (a relay that stops answering fails the test instead of hanging it)
    master.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    master.set_write_timeout(Some(Duration::from_secs(60))).unwrap();
    let link = node.as_raw_fd();
    Some(std::thread::scope(|scope| {
        let relaying = scope.spawn(|| relay_holding(&guest, link, max_unsent).unwrap());
        let waiting = scope.spawn(|| guest.wait(Duration::from_secs(60)));
        let _kept = talk(master);
        (relaying.join().unwrap(), waiting.join().unwrap())
    }))
}

/// The master's frame to the guest, and the guest's next one to the master.
fn ask(master: &mut UnixStream, frame: &[u8]) -> Value {
    frame::write_frame(master, frame).unwrap();
    decode(&frame::read_frame(master, 64 << 20).unwrap().expect("a frame"))
}

/// Calls reach the guest and their replies come back; a shutdown, carried
/// out by the waiting thread, ends the relay once its answer went out.
#[test]
fn the_relay_carries_calls_and_ends_with_the_guest() {
    let ended = relayed("rust-relay", |mut master| {
        for id in 1..=3 {
            let reply = ask(&mut master, &eval_request(id, "6 * 7"));
            assert_eq!(reply, reply_to(id, Value::Integer(42.into())));
        }
        assert_eq!(ask(&mut master, &shutdown_request(9)), reply_to(9, Value::Null));
        Some(master)
    });
    if let Some(ended) = ended {
        assert_eq!(ended, (RelayEnd::GuestEnded, Some(GuestEnd::Exited(0))));
    }
}

/// The master's end of the link closes: the relay stops the guest.
#[test]
fn the_relay_stops_the_guest_when_the_master_is_gone() {
    let ended = relayed("rust-relay-gone", |mut master| {
        let reply = ask(&mut master, &eval_request(1, "1 + 1"));
        assert_eq!(reply, reply_to(1, Value::Integer(2.into())));
        None
    });
    if let Some(ended) = ended {
        assert_eq!(ended, (RelayEnd::MasterGone, Some(GuestEnd::Killed)));
    }
}

/// A reply larger than the socket takes at once, while the master does not
/// read but goes on sending requests, more than the socket holds: the
/// relay queues the reply for its writer and keeps reading the master (a
/// relay that waited to write it would leave the master blocked in its
/// send); all replies then arrive, whole and in order.
#[test]
fn the_relay_reads_the_master_while_the_master_does_not_read() {
    let ended = relayed("rust-relay-queue", |mut master| {
        frame::write_frame(&mut master, &eval_request(1, "b'1' * (4 << 20)")).unwrap();
        let long = format!("len('{}')", "x".repeat(1 << 20));
        for id in 2..=5 {
            frame::write_frame(&mut master, &eval_request(id, &long)).unwrap();
        }
        let reply = decode(
            &frame::read_frame(&mut master, 64 << 20)
                .unwrap()
                .expect("a reply"),
        );
        let big = Value::Bytes(b"1".repeat(4 << 20));
        assert!(reply == reply_to(1, big), "the large reply is not whole");
        for id in 2..=5 {
            let reply = decode(
                &frame::read_frame(&mut master, 64 << 20)
                    .unwrap()
                    .expect("a reply"),
            );
            assert_eq!(reply, reply_to(id, Value::Integer((1u64 << 20).into())));
        }
        assert_eq!(ask(&mut master, &shutdown_request(9)), reply_to(9, Value::Null));
        Some(master)
    });
    if let Some(ended) = ended {
        assert_eq!(ended, (RelayEnd::GuestEnded, Some(GuestEnd::Exited(0))));
    }
}

/// Past its limit of unsent bytes the relay reads the master no more: a
/// master that sends requests without reading its replies is held back by
/// its own socket (its requests wait there, not in the guest's queue, which
/// has no bound); once it reads, everything goes on, in order.
#[test]
fn the_relay_stops_reading_the_master_past_its_limit_of_unsent_bytes() {
    let ended = relayed_holding("rust-relay-full", 1 << 20, |mut master| {
        frame::write_frame(&mut master, &eval_request(1, "b'1' * (4 << 20)")).unwrap();
        // 16 MiB of requests after it, far more than the socket holds
        let long = format!("len('{}')", "x".repeat(64 << 10));
        let mut requests = Vec::new();
        for id in 2..=257 {
            frame::write_frame(&mut requests, &eval_request(id, &long)).unwrap();
        }
        master.set_write_timeout(Some(Duration::from_secs(2))).unwrap();
        let mut written = 0;
        while written < requests.len() {
            match master.write(&requests[written..]) {
                Ok(sent) => written += sent,
                Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => break,
                Err(e) => panic!("writing the requests failed: {e}"),
            }
        }
        assert!(
            written < requests.len(),
            "the relay read all the master sent while 4 MiB waited for the master to read"
        );
        let mut writer = master.try_clone().unwrap();
        writer.set_write_timeout(Some(Duration::from_secs(60))).unwrap();
        std::thread::scope(|scope| {
            scope.spawn(move || writer.write_all(&requests[written..]).unwrap());
            let next = |master: &mut UnixStream| {
                decode(&frame::read_frame(master, 64 << 20).unwrap().expect("a reply"))
            };
            let big = Value::Bytes(b"1".repeat(4 << 20));
            assert!(
                next(&mut master) == reply_to(1, big),
                "the large reply is not whole"
            );
            for id in 2..=257 {
                assert_eq!(
                    next(&mut master),
                    reply_to(id, Value::Integer((64u64 << 10).into()))
                );
            }
        });
        assert_eq!(
            ask(&mut master, &shutdown_request(999)),
            reply_to(999, Value::Null)
        );
        Some(master)
    });
    if let Some(ended) = ended {
        assert_eq!(ended, (RelayEnd::GuestEnded, Some(GuestEnd::Exited(0))));
    }
}
