//! The real `stacyvm-agent` binary, driven over its Unix socket by a small
//! blocking client built on the crate's protocol module. Every agent runs
//! with `--root` set to its own temporary directory.

use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use stacyvm_agent::protocol::{
    read_frame, AgentInfo, ExecSpec, ExitFrame, Frame, Hello, Kind, Request, CHUNK_SIZE,
    MAX_FRAME_LEN, MAX_WINDOW, WINDOW,
};
use stacyvm_core::error::WireError;
use stacyvm_core::{Error, FileEntry, FileType};

type TestResult = Result<(), Box<dyn std::error::Error>>;

/// A running agent with its root and socket; killed and removed on drop.
struct Agent {
    child: Child,
    root: tempfile::TempDir,
    sock: PathBuf,
    _sock_dir: tempfile::TempDir,
}

impl Agent {
    fn start() -> Agent {
        let root = tempfile::tempdir().expect("a temporary root");
        let sock_dir = tempfile::tempdir().expect("a temporary socket dir");
        let sock = sock_dir.path().join("agent.sock");
        // A stale socket file from an earlier agent must not stop this one.
        drop(std::os::unix::net::UnixListener::bind(&sock).expect("a stale socket"));
        let child = Command::new(env!("CARGO_BIN_EXE_stacyvm-agent"))
            .arg("--listen")
            .arg(&sock)
            .arg("--root")
            .arg(root.path())
            .stdin(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("the agent starts");
        let agent = Agent {
            child,
            root,
            sock,
            _sock_dir: sock_dir,
        };
        for _ in 0..500 {
            if UnixStream::connect(&agent.sock).is_ok() {
                return agent;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("the agent never listened on {}", agent.sock.display());
    }

    fn connect(&self) -> Conn {
        let mut c = self.connect_raw();
        let info = c.hello(&[1]).expect("hello succeeds");
        assert_eq!(info.protocol, 1);
        assert_eq!(info.pid, self.child.id());
        c
    }

    fn connect_raw(&self) -> Conn {
        let s = UnixStream::connect(&self.sock).expect("connects");
        // A broken agent fails the test instead of hanging it.
        s.set_read_timeout(Some(Duration::from_secs(60)))
            .expect("read timeout");
        Conn { s, next: 1 }
    }

    fn host(&self, p: &str) -> PathBuf {
        self.root.path().join(p.trim_start_matches('/'))
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A blocking test client: one request at a time unless a test interleaves
/// frames by hand.
struct Conn {
    s: UnixStream,
    next: u32,
}

type Answer<T> = Result<T, Error>;

/// The error an `Error` frame carries.
fn wire(f: &Frame) -> Error {
    f.parse::<WireError>().expect("a wire error").into()
}

impl Conn {
    fn hello(&mut self, versions: &[u32]) -> Answer<AgentInfo> {
        self.hello_asking(versions, None)
    }

    fn hello_asking(&mut self, versions: &[u32], window: Option<u32>) -> Answer<AgentInfo> {
        self.send(&Frame::json(
            0,
            Kind::Hello,
            &Hello {
                versions: versions.to_vec(),
                window,
            },
        ));
        let f = self.recv();
        match f.kind {
            Kind::HelloOk => Ok(f.parse().expect("agent info")),
            Kind::Error => Err(wire(&f)),
            k => panic!("unexpected {k:?} answering hello"),
        }
    }

    fn send(&mut self, f: &Frame) {
        self.s.write_all(&f.encode()).expect("send");
    }

    fn send_raw(&mut self, bytes: &[u8]) {
        self.s.write_all(bytes).expect("send");
    }

    fn recv(&mut self) -> Frame {
        match read_frame(&mut self.s) {
            Ok(f) => f,
            Err(e) => panic!("reading a frame: {e}"),
        }
    }

    /// True once the agent closed the connection.
    fn closed(&mut self) -> bool {
        read_frame(&mut self.s).is_err()
    }

    fn request(&mut self, req: &Request) -> u32 {
        let id = self.next;
        self.next += 1;
        self.send(&Frame::json(id, Kind::Request, req));
        id
    }

    /// Receives the next frame that is not credit for our uploads.
    fn recv_answer(&mut self) -> Frame {
        loop {
            let f = self.recv();
            if f.kind != Kind::Credit {
                return f;
            }
        }
    }

    fn ok<T: for<'de> serde::Deserialize<'de>>(&mut self, req: &Request) -> Answer<T> {
        self.request(req);
        let f = self.recv_answer();
        match f.kind {
            Kind::Ok => Ok(f.parse().expect("a JSON answer")),
            Kind::Error => Err(wire(&f)),
            k => panic!("unexpected {k:?}"),
        }
    }

    fn batches<T: for<'de> serde::Deserialize<'de>>(&mut self, req: &Request) -> Answer<Vec<T>> {
        let id = self.request(req);
        let mut all = Vec::new();
        loop {
            let f = self.recv_answer();
            match f.kind {
                Kind::Data => {
                    all.extend(f.parse::<Vec<T>>().expect("a JSON batch"));
                    self.send(&Frame::credit(id, 1));
                }
                Kind::End => return Ok(all),
                Kind::Error => return Err(wire(&f)),
                k => panic!("unexpected {k:?}"),
            }
        }
    }

    /// Sends `data` as an upload within the credit window.
    fn upload(&mut self, id: u32, data: &[u8]) -> Answer<()> {
        let mut credit = WINDOW;
        for piece in data.chunks(CHUNK_SIZE) {
            while credit == 0 {
                let f = self.recv();
                match f.kind {
                    Kind::Credit => credit += f.credit_count().expect("a credit count"),
                    Kind::Error => return Err(wire(&f)),
                    k => panic!("unexpected {k:?} during an upload"),
                }
            }
            credit -= 1;
            self.send(&Frame::new(id, Kind::Data, piece.to_vec()));
        }
        self.send(&Frame::empty(id, Kind::End));
        Ok(())
    }

    fn write(&mut self, path: &str, mode: Option<u32>, data: &[u8]) -> Answer<FileEntry> {
        self.write_as(path, mode, None, data)
    }

    fn write_as(
        &mut self,
        path: &str,
        mode: Option<u32>,
        user: Option<&str>,
        data: &[u8],
    ) -> Answer<FileEntry> {
        let id = self.request(&Request::FileWrite {
            path: path.into(),
            mode,
            user: user.map(str::to_owned),
            xattrs: Default::default(),
        });
        self.upload(id, data)?;
        let f = self.recv_answer();
        match f.kind {
            Kind::Ok => Ok(f.parse().expect("an entry")),
            Kind::Error => Err(wire(&f)),
            k => panic!("unexpected {k:?}"),
        }
    }

    fn read(&mut self, path: &str) -> Answer<Vec<u8>> {
        let id = self.request(&Request::FileRead { path: path.into() });
        let mut out = Vec::new();
        loop {
            let f = self.recv();
            match f.kind {
                Kind::Data => {
                    assert!(f.payload.len() <= CHUNK_SIZE);
                    out.extend_from_slice(&f.payload);
                    self.send(&Frame::credit(id, 1));
                }
                Kind::End => return Ok(out),
                Kind::Error => return Err(wire(&f)),
                k => panic!("unexpected {k:?}"),
            }
        }
    }

    fn exec(&mut self, spec: ExecSpec, stdin: Option<&[u8]>) -> Answer<Outcome> {
        let id = self.request(&Request::Exec(ExecSpec {
            stdin: stdin.is_some(),
            ..spec
        }));
        if let Some(data) = stdin {
            self.upload(id, data)?;
        }
        let mut out = Outcome::default();
        loop {
            let f = self.recv_answer();
            match f.kind {
                Kind::Stdout | Kind::Stderr => {
                    let buf = if f.kind == Kind::Stdout {
                        &mut out.stdout
                    } else {
                        &mut out.stderr
                    };
                    buf.extend_from_slice(&f.payload);
                    self.send(&Frame::credit(id, 1));
                }
                Kind::Exit => {
                    out.exit = f.parse().expect("an exit");
                    return Ok(out);
                }
                Kind::Error => return Err(wire(&f)),
                Kind::Ok => {} // the start acknowledgement of a streaming exec
                k => panic!("unexpected {k:?}"),
            }
        }
    }

    fn run(&mut self, args: &[&str]) -> Outcome {
        self.exec(spec(args), None).expect("exec runs")
    }
}

#[derive(Debug, Default)]
struct Outcome {
    stdout: Vec<u8>,
    stderr: Vec<u8>,
    exit: ExitFrame,
}

fn spec(args: &[&str]) -> ExecSpec {
    ExecSpec {
        cmd: args.iter().map(|s| s.to_string()).collect(),
        env: BTreeMap::new(),
        cwd: None,
        stdin: false,
        timeout_ms: 60_000,
        output_cap: 16 << 20,
        stream: false,
        pty: None,
        user: None,
    }
}

fn code(e: &Answer<impl std::fmt::Debug>) -> &'static str {
    match e {
        Err(e) => e.code(),
        Ok(v) => panic!("expected an error, got {v:?}"),
    }
}

/// Waits (bounded) until `pid` is gone or a zombie; false if it stays.
fn gone(pid: i32) -> bool {
    for _ in 0..1000 {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"));
        let running = match stat {
            Err(_) => false,
            Ok(s) => !s
                .rsplit(')')
                .next()
                .is_some_and(|r| r.trim_start().starts_with('Z')),
        };
        if !running {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    false
}

#[test]
fn exec_reports_exit_codes_output_stdin_env_and_cwd() -> TestResult {
    let agent = Agent::start();
    let mut c = agent.connect();

    let out = c.run(&["sh", "-c", "echo out; echo err >&2; exit 7"]);
    assert_eq!(out.exit.status.exit_code, Some(7));
    assert_eq!(out.exit.status.signal, None);
    assert!(!out.exit.status.timed_out);
    assert_eq!(out.stdout, b"out\n");
    assert_eq!(out.stderr, b"err\n");

    let input: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    let out = c.exec(spec(&["cat"]), Some(&input))?;
    assert!(out.stdout == input, "stdin did not come back through cat");
    assert_eq!(out.exit.status.exit_code, Some(0));

    // Without stdin, a reader sees end of input at once.
    assert_eq!(c.run(&["cat"]).exit.status.exit_code, Some(0));

    let mut s = spec(&["sh", "-c", "echo \"$A-$B\"; echo \"$PATH\""]);
    s.env.insert("A".into(), "one".into());
    s.env.insert("B".into(), "two words".into());
    let out = c.exec(s, None)?;
    let text = String::from_utf8(out.stdout)?;
    let mut lines = text.lines();
    assert_eq!(lines.next(), Some("one-two words"));
    assert!(lines.next().is_some_and(|p| p.contains("/bin")));

    // Commands get the default SIGPIPE disposition back (the agent ignores
    // it), so a pipeline ends when its reader does.
    let out = c.run(&["sh", "-c", "yes | head -n 1"]);
    assert_eq!(
        (out.stdout.as_slice(), out.exit.status.exit_code),
        (&b"y\n"[..], Some(0))
    );

    // Arguments are never joined into a shell string.
    let out = c.run(&["echo", "$HOME", "a;b", "*"]);
    assert_eq!(out.stdout, b"$HOME a;b *\n");

    std::fs::create_dir_all(agent.host("/work/sub"))?;
    let mut s = spec(&["pwd"]);
    s.cwd = Some("/work/../work/sub".into());
    let out = c.exec(s, None)?;
    let cwd = PathBuf::from(String::from_utf8(out.stdout)?.trim());
    assert_eq!(cwd.canonicalize()?, agent.host("/work/sub").canonicalize()?);

    let mut s = spec(&["pwd"]);
    s.cwd = Some("/nope".into());
    assert_eq!(code(&c.exec(s, None)), "invalid_request");
    assert_eq!(code(&c.exec(spec(&[]), None)), "invalid_request");
    Ok(())
}

#[test]
fn programs_that_cannot_start_exit_127_or_126() -> TestResult {
    let agent = Agent::start();
    let mut c = agent.connect();
    let out = c.run(&["no-such-program-anywhere"]);
    assert_eq!(out.exit.status.exit_code, Some(127));
    assert!(String::from_utf8(out.stderr)?.contains("not found"));

    let script = agent.host("/not-executable.sh");
    std::fs::write(&script, "#!/bin/sh\necho hi\n")?;
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o644))?;
    let script = script.to_string_lossy().into_owned();
    let out = c.run(&[&script]);
    assert_eq!(out.exit.status.exit_code, Some(126));
    assert!(!out.stderr.is_empty());

    let dir = agent.root.path().to_string_lossy().into_owned();
    assert_eq!(c.run(&[&dir]).exit.status.exit_code, Some(126));
    Ok(())
}

#[test]
fn a_timeout_kills_the_whole_process_group() -> TestResult {
    let agent = Agent::start();
    let mut c = agent.connect();
    let mut s = spec(&["sh", "-c", "sleep 1000 & echo $!; wait"]);
    s.timeout_ms = 300;
    let out = c.exec(s, None)?;
    assert!(out.exit.status.timed_out);
    assert_eq!(out.exit.status.exit_code, None);
    assert_eq!(out.exit.status.signal, Some(9));
    let grandchild: i32 = String::from_utf8(out.stdout)?.trim().parse()?;
    assert!(
        gone(grandchild),
        "the backgrounded sleep {grandchild} survived the timeout"
    );
    Ok(())
}

#[test]
fn a_background_process_holding_the_pipes_does_not_hang_the_exec() -> TestResult {
    let agent = Agent::start();
    let mut c = agent.connect();
    // The backgrounded sleep keeps stdout open after sh exits.
    let out = c.run(&["sh", "-c", "sleep 1000 & echo $!; echo done"]);
    assert_eq!(out.exit.status.exit_code, Some(0));
    let text = String::from_utf8(out.stdout)?;
    assert!(text.ends_with("done\n"));
    let pid: i32 = text.lines().next().unwrap_or_default().parse()?;
    // It is the caller's background job: still there, until we end it.
    // SAFETY: kill(2) has no memory-safety preconditions.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    Ok(())
}

#[test]
fn output_past_the_cap_is_cut_and_flagged() -> TestResult {
    let agent = Agent::start();
    let mut c = agent.connect();
    let mut s = spec(&[
        "sh",
        "-c",
        "head -c 300000 /dev/zero; head -c 10 /dev/zero >&2",
    ]);
    s.output_cap = 100_000;
    let out = c.exec(s, None)?;
    assert_eq!(out.stdout.len(), 100_000);
    assert!(out.exit.stdout_truncated);
    assert_eq!(out.stderr.len(), 10);
    assert!(!out.exit.stderr_truncated);
    assert_eq!(out.exit.status.exit_code, Some(0));
    Ok(())
}

#[test]
fn streaming_sends_output_while_the_command_runs() -> TestResult {
    let agent = Agent::start();
    let mut c = agent.connect();

    let mut s = spec(&["sh", "-c", "echo a; sleep 2; echo b"]);
    s.stream = true;
    let id = c.request(&Request::Exec(s));
    assert_eq!(c.recv().kind, Kind::Ok, "a streaming exec is acknowledged");
    let first = c.recv();
    assert_eq!(
        (first.id, first.kind, first.payload.as_slice()),
        (id, Kind::Stdout, &b"a\n"[..])
    );
    c.send(&Frame::credit(id, 1));
    let second = c.recv();
    assert_eq!(
        (second.kind, second.payload.as_slice()),
        (Kind::Stdout, &b"b\n"[..])
    );
    assert_eq!(c.recv().kind, Kind::Exit);

    // Proof that output is not held back until the end: the command only
    // finishes after we answered what it printed first.
    let mut s = spec(&["sh", "-c", "echo ready; read line; echo got $line"]);
    s.stream = true;
    s.stdin = true;
    let id = c.request(&Request::Exec(s));
    assert_eq!(c.recv().kind, Kind::Ok);
    let first = c.recv();
    assert_eq!(
        (first.kind, first.payload.as_slice()),
        (Kind::Stdout, &b"ready\n"[..])
    );
    c.send(&Frame::new(id, Kind::Data, b"go\n".to_vec()));
    c.send(&Frame::empty(id, Kind::End));
    let next = c.recv_answer();
    assert_eq!(
        (next.kind, next.payload.as_slice()),
        (Kind::Stdout, &b"got go\n"[..])
    );
    let exit: ExitFrame = c.recv_answer().parse()?;
    assert_eq!(exit.status.exit_code, Some(0));
    Ok(())
}

#[test]
fn cancel_kills_a_running_command() -> TestResult {
    let agent = Agent::start();
    let mut c = agent.connect();
    let mut s = spec(&["sh", "-c", "echo $$; exec sleep 1000"]);
    s.stream = true;
    let id = c.request(&Request::Exec(s));
    assert_eq!(c.recv().kind, Kind::Ok);
    let pid: i32 = String::from_utf8(c.recv().payload)?.trim().parse()?;
    c.send(&Frame::empty(id, Kind::Cancel));
    let exit = c.recv_answer();
    assert_eq!(exit.kind, Kind::Exit);
    let exit: ExitFrame = exit.parse()?;
    assert_eq!(exit.status.signal, Some(9));
    assert!(gone(pid), "the cancelled command {pid} survived");
    // The connection goes on.
    assert_eq!(c.run(&["true"]).exit.status.exit_code, Some(0));
    Ok(())
}

#[test]
fn requests_on_one_connection_run_concurrently() -> TestResult {
    let agent = Agent::start();
    let mut c = agent.connect();
    let mut slow = spec(&["sh", "-c", "read x; echo slow $x"]);
    slow.stdin = true;
    let slow_id = c.request(&Request::Exec(slow));
    // While the first command waits for input, a second one completes.
    let out = c.run(&["echo", "fast"]);
    assert_eq!(out.stdout, b"fast\n");
    c.send(&Frame::new(slow_id, Kind::Data, b"done\n".to_vec()));
    c.send(&Frame::empty(slow_id, Kind::End));
    let f = c.recv_answer();
    assert_eq!((f.id, f.payload.as_slice()), (slow_id, &b"slow done\n"[..]));
    Ok(())
}

#[test]
fn a_binary_mebibyte_round_trips() -> TestResult {
    let agent = Agent::start();
    let mut c = agent.connect();
    let data: Vec<u8> = (0..(1usize << 20))
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let e = c.write("/bin-data/one.bin", None, &data)?;
    assert_eq!(
        (e.size, e.mode.as_str(), e.file_type),
        (1 << 20, "0644", FileType::File)
    );
    assert!(std::fs::read(agent.host("/bin-data/one.bin"))? == data);
    assert!(c.read("/bin-data/one.bin")? == data);
    // Replacing leaves no temporary files behind.
    c.write("/bin-data/one.bin", Some(0o700), b"short")?;
    assert_eq!(c.read("/bin-data/one.bin")?, b"short");
    assert_eq!(std::fs::read_dir(agent.host("/bin-data"))?.count(), 1);
    let meta = std::fs::metadata(agent.host("/bin-data/one.bin"))?;
    assert_eq!(meta.permissions().mode() & 0o7777, 0o700);
    Ok(())
}

#[test]
fn commands_run_as_and_files_belong_to_a_user_of_the_sandboxes_passwd() -> TestResult {
    use std::os::unix::fs::MetadataExt;
    // SAFETY: geteuid has no preconditions.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "switching users needs root: run the suite as root (scripts/test.sh does)"
    );
    let agent = Agent::start();
    // Commands start in the root when they name no directory: the user
    // must be able to enter it.
    std::fs::set_permissions(agent.root.path(), std::fs::Permissions::from_mode(0o755))?;
    std::fs::create_dir_all(agent.host("/etc"))?;
    std::fs::create_dir_all(agent.host("/home"))?;
    std::fs::write(
        agent.host("/etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\nuser:x:1000:1001::/home/user:/bin/sh\n",
    )?;
    let mut c = agent.connect();

    let mut as_user = spec(&["sh", "-c", "id -u; id -g; id -G; echo $HOME $USER $LOGNAME"]);
    as_user.user = Some("user".into());
    let out = c.exec(as_user.clone(), None)?;
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "1000\n1001\n1001\n/home/user user user\n",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // A uid works without a passwd line, and the env it is given wins.
    let mut by_uid = spec(&["sh", "-c", "id -u; echo $HOME"]);
    by_uid.user = Some("4242".into());
    by_uid.env.insert("HOME".into(), "/tmp".into());
    let out = c.exec(by_uid, None)?;
    assert_eq!(String::from_utf8_lossy(&out.stdout), "4242\n/tmp\n");
    as_user.user = Some("nobody-here".into());
    let e = c.exec(as_user, None).expect_err("an unknown user");
    assert_eq!(e.code(), "invalid_request");
    assert!(e.to_string().contains("no user \"nobody-here\""), "{e}");

    // A file written for the user is theirs, with the directories made for
    // it; those that existed keep their owner.
    c.write_as("/home/user/new/notes.txt", Some(0o640), Some("user"), b"hi")?;
    for (p, uid) in [
        ("/home/user/new/notes.txt", 1000),
        ("/home/user/new", 1000),
        ("/home/user", 1000),
        ("/home", 0),
    ] {
        let m = std::fs::symlink_metadata(agent.host(p))?;
        assert_eq!(m.uid(), uid, "{p}");
    }
    let m = std::fs::metadata(agent.host("/home/user/new/notes.txt"))?;
    assert_eq!((m.gid(), m.mode() & 0o7777), (1001, 0o640));
    let made: FileEntry = c.ok(&Request::FileMkdir {
        path: "/home/user/a/b".into(),
        parents: true,
        user: Some("user".into()),
    })?;
    assert_eq!(made.uid, Some(1000));
    assert_eq!(std::fs::metadata(agent.host("/home/user/a"))?.uid(), 1000);
    // Without a user, files stay the agent's.
    c.write("/home/user/root.txt", None, b"r")?;
    assert_eq!(
        std::fs::metadata(agent.host("/home/user/root.txt"))?.uid(),
        0
    );
    let e = c
        .write_as("/x.txt", None, Some("ghost"), b"x")
        .expect_err("an unknown owner");
    assert_eq!(e.code(), "invalid_request");
    assert!(!agent.host("/x.txt").exists());
    Ok(())
}

#[test]
fn file_operations_follow_the_api_semantics() -> TestResult {
    let agent = Agent::start();
    let mut c = agent.connect();

    c.write("/w/a.txt", None, b"aaa")?;
    c.write("/w/sub/b.py", None, b"b")?;
    c.write("/w/sub/deep/c.py", None, b"c")?;
    symlink("a.txt", agent.host("/w/link"))?;

    // stat does not follow symlinks.
    let st: FileEntry = c.ok(&Request::FileStat {
        path: "/w/link".into(),
    })?;
    assert_eq!(
        (st.file_type, st.symlink_target.as_deref(), st.name.as_str()),
        (FileType::Symlink, Some("a.txt"), "link")
    );
    let st: FileEntry = c.ok(&Request::FileStat {
        path: "/w/./sub/../a.txt".into(),
    })?;
    assert_eq!(
        (st.path.as_str(), st.size, st.file_type),
        ("/w/a.txt", 3, FileType::File)
    );
    assert_eq!(
        code(&c.ok::<FileEntry>(&Request::FileStat {
            path: "/w/none".into()
        })),
        "not_found"
    );
    assert_eq!(
        code(&c.ok::<FileEntry>(&Request::FileStat {
            path: "w/a.txt".into()
        })),
        "invalid_request"
    );
    assert_eq!(
        code(&c.ok::<FileEntry>(&Request::FileStat {
            path: "/w/a\0".into()
        })),
        "invalid_request"
    );
    // A read follows the link.
    assert_eq!(c.read("/w/link")?, b"aaa");
    assert_eq!(code(&c.read("/w")), "invalid_request");
    assert_eq!(code(&c.read("/w/none")), "not_found");

    // list: sorted, recursive on demand, symlinks listed not followed.
    let flat: Vec<FileEntry> = c.batches(&Request::FileList {
        path: "/w".into(),
        recursive: false,
    })?;
    let paths: Vec<_> = flat.iter().map(|e| e.path.as_str()).collect();
    assert_eq!(paths, ["/w/a.txt", "/w/link", "/w/sub"]);
    let deep: Vec<FileEntry> = c.batches(&Request::FileList {
        path: "/w".into(),
        recursive: true,
    })?;
    let paths: Vec<_> = deep.iter().map(|e| e.path.as_str()).collect();
    assert_eq!(
        paths,
        [
            "/w/a.txt",
            "/w/link",
            "/w/sub",
            "/w/sub/b.py",
            "/w/sub/deep",
            "/w/sub/deep/c.py"
        ]
    );
    assert_eq!(
        code(&c.batches::<FileEntry>(&Request::FileList {
            path: "/w/a.txt".into(),
            recursive: false
        })),
        "invalid_request"
    );
    assert_eq!(
        code(&c.batches::<FileEntry>(&Request::FileList {
            path: "/nope".into(),
            recursive: false
        })),
        "not_found"
    );

    // glob: `*` stays in a directory, `**` crosses them, results sorted.
    let g: Vec<String> = c.batches(&Request::FileGlob {
        pattern: "/w/**/*.py".into(),
    })?;
    assert_eq!(g, ["/w/sub/b.py", "/w/sub/deep/c.py"]);
    let g: Vec<String> = c.batches(&Request::FileGlob {
        pattern: "/w/*".into(),
    })?;
    assert_eq!(g, ["/w/a.txt", "/w/link", "/w/sub"]);
    let g: Vec<String> = c.batches(&Request::FileGlob {
        pattern: "/w/*.py".into(),
    })?;
    assert!(g.is_empty());
    assert_eq!(
        code(&c.batches::<String>(&Request::FileGlob {
            pattern: "/w/[".into()
        })),
        "invalid_request"
    );
    assert_eq!(
        code(&c.batches::<String>(&Request::FileGlob {
            pattern: "*.py".into()
        })),
        "invalid_request"
    );

    // move: conflict without overwrite, replaces with it, makes parents.
    c.write("/m/x", None, b"x")?;
    c.write("/m/y", None, b"y")?;
    let mv = |from: &str, to: &str, overwrite| Request::FileMove {
        from: from.into(),
        to: to.into(),
        overwrite,
    };
    assert_eq!(
        code(&c.ok::<FileEntry>(&mv("/m/x", "/m/y", false))),
        "conflict"
    );
    let e: FileEntry = c.ok(&mv("/m/x", "/m/y", true))?;
    assert_eq!((e.path.as_str(), e.size), ("/m/y", 1));
    assert_eq!(c.read("/m/y")?, b"x");
    assert_eq!(code(&c.read("/m/x")), "not_found");
    let e: FileEntry = c.ok(&mv("/m/y", "/m/new/dir/z", false))?;
    assert_eq!(e.path, "/m/new/dir/z");
    assert_eq!(
        code(&c.ok::<FileEntry>(&mv("/m/missing", "/m/q", false))),
        "not_found"
    );
    assert_eq!(
        code(&c.ok::<FileEntry>(&mv("/m", "/m/new/inside", false))),
        "invalid_request"
    );

    // chmod
    let e: FileEntry = c.ok(&Request::FileChmod {
        path: "/m/new/dir/z".into(),
        mode: 0o751,
    })?;
    assert_eq!(e.mode, "0751");
    assert_eq!(
        code(&c.ok::<FileEntry>(&Request::FileChmod {
            path: "/m/none".into(),
            mode: 0o644
        })),
        "not_found"
    );

    // mkdir: exists → conflict, unless parents and a directory.
    let mk = |p: &str, parents| Request::FileMkdir {
        path: p.into(),
        parents,
        user: None,
    };
    let e: FileEntry = c.ok(&mk("/d1", false))?;
    assert_eq!((e.file_type, e.path.as_str()), (FileType::Dir, "/d1"));
    assert_eq!(code(&c.ok::<FileEntry>(&mk("/d1", false))), "conflict");
    c.ok::<FileEntry>(&mk("/d1", true))?;
    assert_eq!(code(&c.ok::<FileEntry>(&mk("/d2/a/b", false))), "not_found");
    c.ok::<FileEntry>(&mk("/d2/a/b", true))?;
    assert!(agent.host("/d2/a/b").is_dir());
    assert_eq!(code(&c.ok::<FileEntry>(&mk("/w/a.txt", true))), "conflict");
    assert_eq!(
        code(&c.ok::<FileEntry>(&mk("/w/a.txt/x", true))),
        "invalid_request"
    );

    // delete: missing → not_found, non-empty dir → conflict, `/` refused.
    let del = |p: &str, recursive| Request::FileDelete {
        path: p.into(),
        recursive,
    };
    assert_eq!(code(&c.ok::<()>(&del("/nothing", false))), "not_found");
    assert_eq!(code(&c.ok::<()>(&del("/d2", false))), "conflict");
    c.ok::<()>(&del("/d2", true))?;
    assert!(!agent.host("/d2").exists());
    c.ok::<()>(&del("/d1", false))?;
    assert_eq!(code(&c.ok::<()>(&del("/", true))), "invalid_request");
    assert_eq!(code(&c.ok::<()>(&del("/..", true))), "invalid_request");
    // Deleting a symlink removes the link, not its target.
    c.ok::<()>(&del("/w/link", false))?;
    assert!(agent.host("/w/a.txt").exists());

    // Long answers travel in several batches.
    std::fs::create_dir_all(agent.host("/many"))?;
    for i in 0..3000 {
        std::fs::write(agent.host(&format!("/many/{i:05}-{}", "n".repeat(200))), "")?;
    }
    let many: Vec<FileEntry> = c.batches(&Request::FileList {
        path: "/many".into(),
        recursive: false,
    })?;
    assert_eq!(many.len(), 3000);
    assert!(many.windows(2).all(|w| w[0].path < w[1].path));
    let g: Vec<String> = c.batches(&Request::FileGlob {
        pattern: "/many/*".into(),
    })?;
    assert_eq!(g.len(), 3000);

    // Recursive walks from above /proc and /sys do not enter them; walks
    // from inside do.
    std::fs::create_dir_all(agent.host("/proc/1"))?;
    std::fs::write(agent.host("/proc/1/status"), "x")?;
    let all: Vec<FileEntry> = c.batches(&Request::FileList {
        path: "/".into(),
        recursive: true,
    })?;
    assert!(all.iter().any(|e| e.path == "/proc"));
    assert!(!all.iter().any(|e| e.path.starts_with("/proc/")));
    let g: Vec<String> = c.batches(&Request::FileGlob {
        pattern: "/**/status".into(),
    })?;
    assert!(g.is_empty(), "{g:?}");
    let g: Vec<String> = c.batches(&Request::FileGlob {
        pattern: "/proc/*/status".into(),
    })?;
    assert_eq!(g, ["/proc/1/status"]);

    // write onto a directory is refused.
    assert_eq!(code(&c.write("/w/sub", None, b"x")), "invalid_request");
    Ok(())
}

#[test]
fn paths_never_leave_the_root() -> TestResult {
    let agent = Agent::start();
    let mut c = agent.connect();
    let marker = format!("stacyvm-escape-{}", std::process::id());
    symlink("/etc", agent.host("/etc-link"))?;
    std::fs::create_dir_all(agent.host("/a/b"))?;
    symlink("../../../../../../..", agent.host("/a/b/up"))?;

    // The link to /etc resolves to <root>/etc, which does not exist.
    assert_eq!(code(&c.read("/etc-link/passwd")), "not_found");
    assert_eq!(code(&c.read("/../../../../etc/passwd")), "not_found");
    assert_eq!(code(&c.read("/a/b/up/etc/passwd")), "not_found");

    // Writes through them land inside the root.
    c.write(&format!("/etc-link/{marker}"), None, b"inside")?;
    assert!(!Path::new("/etc").join(&marker).exists());
    assert_eq!(
        std::fs::read(agent.host(&format!("/etc/{marker}")))?,
        b"inside"
    );
    c.write(&format!("/a/b/up/tmp/{marker}"), None, b"inside")?;
    assert!(!Path::new("/tmp").join(&marker).exists());
    assert!(agent.host(&format!("/tmp/{marker}")).exists());

    let listed: Vec<FileEntry> = c.batches(&Request::FileList {
        path: "/a/b/up".into(),
        recursive: false,
    })?;
    // Listing through the `..` link shows the root's own entries.
    let mut names: Vec<String> = listed.iter().map(|e| e.name.clone()).collect();
    names.sort();
    let mut in_root: Vec<String> = std::fs::read_dir(agent.root.path())?
        .map(|d| d.map(|d| d.file_name().to_string_lossy().into_owned()))
        .collect::<Result<_, _>>()?;
    in_root.sort();
    assert_eq!(names, in_root);
    let g: Vec<String> = c.batches(&Request::FileGlob {
        pattern: "/etc-link/*".into(),
    })?;
    assert_eq!(g, [format!("/etc-link/{marker}")]);

    // A symlink loop is an error, not a hang.
    symlink("loop-b", agent.host("/loop-a"))?;
    symlink("loop-a", agent.host("/loop-b"))?;
    assert_eq!(code(&c.read("/loop-a")), "invalid_request");
    Ok(())
}

#[test]
fn bad_frames_close_only_their_connection() -> TestResult {
    let agent = Agent::start();
    let mut good = agent.connect();

    // An unknown kind: answered with an error for that request, then closed.
    let mut bad = agent.connect();
    bad.send_raw(&[0, 0, 0, 6, 0, 0, 0, 42, 200, 1]);
    let f = bad.recv();
    assert_eq!((f.id, f.kind), (42, Kind::Error));
    assert!(bad.closed());
    assert_eq!(good.run(&["echo", "still"]).stdout, b"still\n");

    // An oversize length.
    let mut bad = agent.connect();
    let mut frame = ((MAX_FRAME_LEN + 1) as u32).to_be_bytes().to_vec();
    frame.extend_from_slice(&9u32.to_be_bytes());
    bad.send_raw(&frame);
    let f = bad.recv();
    assert_eq!((f.id, f.kind), (9, Kind::Error));
    assert!(bad.closed());

    // Malformed JSON and unknown operations.
    for payload in [
        &b"{not json"[..],
        br#"{"op":"format_disk"}"#,
        br#"{"op":"file_stat"}"#,
    ] {
        let mut bad = agent.connect();
        bad.send(&Frame::new(5, Kind::Request, payload.to_vec()));
        let f = bad.recv();
        assert_eq!((f.id, f.kind), (5, Kind::Error));
        let w: WireError = f.parse()?;
        assert_eq!(w.code, "invalid_request");
        assert!(bad.closed());
    }

    // Deeply nested JSON is refused, not a stack overflow.
    for nested in [
        format!("{}{}", "[".repeat(100_000), "]".repeat(100_000)),
        format!(
            r#"{{"op":"exec","cmd":{}1{}}}"#,
            "[".repeat(120),
            "]".repeat(120)
        ),
    ] {
        let mut bad = agent.connect();
        bad.send(&Frame::new(6, Kind::Request, nested.into_bytes()));
        let f = bad.recv();
        assert_eq!((f.id, f.kind), (6, Kind::Error));
        assert!(bad.closed());
    }

    // A frame length below the header size, and random garbage.
    let mut bad = agent.connect();
    bad.send_raw(&[0, 0, 0, 1, 7]);
    let f = bad.recv();
    assert_eq!(f.kind, Kind::Error);
    assert!(bad.closed());
    let mut bad = agent.connect_raw();
    bad.send_raw(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_eq!(bad.recv().kind, Kind::Error);
    assert!(bad.closed());

    // Anything but hello first; and no common version.
    let mut bad = agent.connect_raw();
    bad.send(&Frame::json(3, Kind::Request, &Request::Health));
    assert_eq!(bad.recv().kind, Kind::Error);
    assert!(bad.closed());
    let mut bad = agent.connect_raw();
    assert_eq!(bad.hello(&[99]).map_err(|e| e.code()), Err("unsupported"));

    // Uploading past the credit window is a protocol error. The command
    // never reads its stdin, so no credit comes back.
    let mut bad = agent.connect();
    let mut flood = spec(&["sleep", "1000"]);
    flood.stdin = true;
    let id = bad.request(&Request::Exec(flood));
    for _ in 0..(WINDOW * 3) {
        let sent = bad
            .s
            .write_all(&Frame::new(id, Kind::Data, vec![0; CHUNK_SIZE]).encode());
        if sent.is_err() {
            break;
        }
    }
    let f = bad.recv_answer();
    assert_eq!((f.id, f.kind), (id, Kind::Error));
    assert!(bad.closed());

    // Through all of that, the first connection kept working.
    assert_eq!(good.run(&["echo", "alive"]).stdout, b"alive\n");
    let info: AgentInfo = good.ok(&Request::Health)?;
    assert_eq!(info.pid, agent.child.id());
    Ok(())
}

#[test]
fn the_credit_window_is_agreed_in_the_hello() -> TestResult {
    let agent = Agent::start();
    for (asked, agreed) in [
        (None, WINDOW),
        (Some(0), WINDOW),
        (Some(MAX_WINDOW), MAX_WINDOW),
        (Some(u32::MAX), MAX_WINDOW),
    ] {
        let info = agent.connect_raw().hello_asking(&[1], asked)?;
        assert_eq!(info.window, Some(agreed), "asked {asked:?}");
    }

    // A whole agreed window of upload goes through without credit (the
    // command never reads its stdin), and a chunk more is a protocol error.
    let mut wide = agent.connect_raw();
    wide.hello_asking(&[1], Some(MAX_WINDOW))?;
    let mut held = spec(&["sleep", "1000"]);
    held.stdin = true;
    let id = wide.request(&Request::Exec(held));
    let chunk = Frame::new(id, Kind::Data, vec![0; CHUNK_SIZE]).encode();
    for _ in 0..MAX_WINDOW {
        wide.send_raw(&chunk);
    }
    let info: AgentInfo = wide.ok(&Request::Health)?;
    assert_eq!(info.window, Some(MAX_WINDOW));
    wide.send_raw(&chunk);
    let f = wide.recv_answer();
    assert_eq!((f.id, f.kind), (id, Kind::Error));
    assert!(wide.closed());
    Ok(())
}

#[test]
fn the_socket_is_private_and_stdio_mode_works() -> TestResult {
    let agent = Agent::start();
    let mode = std::fs::metadata(&agent.sock)?.permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);

    let root = tempfile::tempdir()?;
    let mut child = Command::new(env!("CARGO_BIN_EXE_stacyvm-agent"))
        .arg("--stdio")
        .arg("--root")
        .arg(root.path())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    let result = (|| -> TestResult {
        let mut input = child.stdin.take().ok_or("stdin")?;
        let mut output = child.stdout.take().ok_or("stdout")?;
        input.write_all(
            &Frame::json(
                0,
                Kind::Hello,
                &Hello {
                    versions: vec![1],
                    window: None,
                },
            )
            .encode(),
        )?;
        assert_eq!(
            read_frame(&mut output).map_err(|e| e.to_string())?.kind,
            Kind::HelloOk
        );
        let req = Request::Exec(spec(&["echo", "over stdio"]));
        input.write_all(&Frame::json(1, Kind::Request, &req).encode())?;
        let f = read_frame(&mut output).map_err(|e| e.to_string())?;
        assert_eq!(
            (f.kind, f.payload.as_slice()),
            (Kind::Stdout, &b"over stdio\n"[..])
        );
        assert_eq!(
            read_frame(&mut output).map_err(|e| e.to_string())?.kind,
            Kind::Exit
        );
        drop(input);
        // End of input ends the agent.
        assert!(child.wait()?.success());
        Ok(())
    })();
    let _ = child.kill();
    let _ = child.wait();
    result
}

#[test]
fn version_flag_prints_the_version() -> TestResult {
    let out = Command::new(env!("CARGO_BIN_EXE_stacyvm-agent"))
        .arg("--version")
        .output()?;
    assert!(out.status.success());
    assert!(String::from_utf8(out.stdout)?.starts_with("stacyvm-agent "));
    let out = Command::new(env!("CARGO_BIN_EXE_stacyvm-agent"))
        .arg("--bogus")
        .output()?;
    assert_eq!(out.status.code(), Some(2));
    Ok(())
}

/// `--init` with the init made a subreaper, as a PID 1 is for its
/// namespace: orphans of the agent's commands are reaped, and the init ends
/// with the agent's status.
fn start_init() -> std::io::Result<(Child, std::process::ChildStdin, std::process::ChildStdout)> {
    use std::os::unix::process::CommandExt;
    let root = std::env::temp_dir();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_stacyvm-agent"));
    cmd.args(["--init", "--stdio", "--root"])
        .arg(root)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    // SAFETY: prctl with integer arguments, between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn()?;
    let input = child.stdin.take().expect("piped stdin");
    let output = child.stdout.take().expect("piped stdout");
    Ok((child, input, output))
}

fn process_state(pid: u32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(')')?.1.trim_start().chars().next()
}

#[test]
fn init_mode_reaps_orphans_and_ends_with_the_agent() -> TestResult {
    let (mut init, mut input, mut output) = start_init()?;
    let result = (|| -> TestResult {
        input.write_all(
            &Frame::json(
                0,
                Kind::Hello,
                &Hello {
                    versions: vec![1],
                    window: None,
                },
            )
            .encode(),
        )?;
        let hello = read_frame(&mut output).map_err(|e| e.to_string())?;
        assert_eq!(hello.kind, Kind::HelloOk);
        let info: AgentInfo = hello.parse().map_err(|e| e.to_string())?;
        assert_ne!(info.pid, init.id(), "the agent is the init's child");
        // The shell exits at once; its background sleep becomes an orphan.
        let req = Request::Exec(spec(&["sh", "-c", "sleep 0.2 & echo $!"]));
        input.write_all(&Frame::json(1, Kind::Request, &req).encode())?;
        let f = read_frame(&mut output).map_err(|e| e.to_string())?;
        assert_eq!(f.kind, Kind::Stdout);
        let orphan: u32 = String::from_utf8_lossy(&f.payload).trim().parse()?;
        assert_eq!(
            read_frame(&mut output).map_err(|e| e.to_string())?.kind,
            Kind::Exit
        );
        let mut gone = false;
        for _ in 0..500 {
            match process_state(orphan) {
                None => {
                    gone = true;
                    break;
                }
                Some(_) => std::thread::sleep(Duration::from_millis(10)),
            }
        }
        assert!(
            gone,
            "the orphan {orphan} was not reaped: {:?}",
            process_state(orphan)
        );
        // SAFETY: kill has no memory preconditions; the pid is the agent's.
        unsafe { libc::kill(info.pid as i32, libc::SIGKILL) };
        let status = init.wait()?;
        assert_eq!(status.code(), Some(128 + libc::SIGKILL));
        Ok(())
    })();
    let _ = init.kill();
    let _ = init.wait();
    result?;

    // An agent that ends normally ends the init with its status.
    let (mut init, input, _output) = start_init()?;
    drop(input);
    assert!(init.wait()?.success());
    Ok(())
}

impl Conn {
    /// Reads a process's output until `Exit` (its status) or `End` (none).
    fn proc_output(
        &mut self,
        pid: u32,
        follow: bool,
    ) -> Answer<(Vec<u8>, Vec<u8>, Option<stacyvm_agent::procs::ProcExit>)> {
        let id = self.request(&Request::ProcOutput { pid, follow });
        let (mut out, mut err) = (Vec::new(), Vec::new());
        loop {
            let f = self.recv_answer();
            match f.kind {
                Kind::Stdout => out.extend_from_slice(&f.payload),
                Kind::Stderr => err.extend_from_slice(&f.payload),
                Kind::Exit => return Ok((out, err, Some(f.parse().expect("an exit")))),
                Kind::End => return Ok((out, err, None)),
                Kind::Error => return Err(wire(&f)),
                k => panic!("unexpected {k:?}"),
            }
            self.send(&Frame::credit(id, 1));
        }
    }

    fn proc_stdin(&mut self, pid: u32, data: &[u8], close: bool) -> Answer<u64> {
        let id = self.request(&Request::ProcStdin { pid, close });
        self.upload(id, data)?;
        let f = self.recv_answer();
        match f.kind {
            Kind::Ok => Ok(f.parse().expect("a count")),
            Kind::Error => Err(wire(&f)),
            k => panic!("unexpected {k:?}"),
        }
    }
}

fn start_req(args: &[&str]) -> Request {
    Request::ProcStart {
        cmd: args.iter().map(|s| s.to_string()).collect(),
        env: BTreeMap::from([("GREETING".to_string(), "hi".to_string())]),
        cwd: None,
        user: None,
    }
}

#[test]
fn background_processes_outlive_their_connection_and_keep_their_output() -> TestResult {
    use stacyvm_agent::procs::ProcInfo;
    let agent = Agent::start();
    let pid = {
        let mut c = agent.connect();
        let info: ProcInfo = c.ok(&start_req(&[
            "sh",
            "-c",
            "echo $GREETING; echo oops >&2; read line; echo got:$line; sleep 600",
        ]))?;
        assert_eq!(info.state, "running");
        info.pid
        // The connection closes here; the process must stay.
    };
    let mut c = agent.connect();
    let list: Vec<ProcInfo> = c.ok(&Request::ProcList)?;
    assert_eq!(list.len(), 1);
    assert_eq!(list[0].pid, pid);
    assert_eq!(list[0].state, "running");
    assert_eq!(c.proc_stdin(pid, b"there\n", false)?, 6);
    // Without follow, what is in the rings now and `End`.
    let mut seen = Vec::new();
    for _ in 0..500 {
        let (out, err, exit) = c.proc_output(pid, false)?;
        assert!(exit.is_none());
        seen = out;
        if seen.ends_with(b"got:there\n") {
            assert_eq!(err, b"oops\n");
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(seen, b"hi\ngot:there\n");
    assert_eq!(
        code(&c.ok::<ProcInfo>(&Request::ProcSignal {
            pid,
            signal: "SEGV".into()
        })),
        "invalid_request"
    );
    let info: ProcInfo = c.ok(&Request::ProcSignal {
        pid,
        signal: "TERM".into(),
    })?;
    assert_eq!(info.pid, pid);
    let (out, _, exit) = c.proc_output(pid, true)?;
    assert_eq!(out, b"hi\ngot:there\n");
    let exit = exit.expect("an exit after follow");
    assert_eq!(exit.status.signal, Some(libc::SIGTERM));
    assert!(gone(pid as i32));
    let info: ProcInfo = c.ok(&Request::ProcGet { pid })?;
    assert_eq!(info.state, "exited");
    assert_eq!(
        code(&c.ok::<ProcInfo>(&Request::ProcGet { pid: 1 })),
        "not_found"
    );
    assert_eq!(
        code(&c.ok::<ProcInfo>(&Request::ProcSignal {
            pid,
            signal: "KILL".into()
        })),
        "conflict"
    );
    Ok(())
}

#[test]
fn background_stdin_closes_and_the_exit_code_is_kept() -> TestResult {
    use stacyvm_agent::procs::ProcInfo;
    let agent = Agent::start();
    let mut c = agent.connect();
    let info: ProcInfo = c.ok(&start_req(&["sh", "-c", "cat; exit 7"]))?;
    c.proc_stdin(info.pid, b"abc", false)?;
    c.proc_stdin(info.pid, b"", true)?;
    let (out, _, exit) = c.proc_output(info.pid, true)?;
    assert_eq!(out, b"abc");
    assert_eq!(exit.expect("an exit").status.exit_code, Some(7));
    assert_eq!(code(&c.proc_stdin(info.pid, b"late", false)), "conflict");
    assert_eq!(
        code(&c.ok::<ProcInfo>(&start_req(&["/no/such/program"]))),
        "invalid_request"
    );
    Ok(())
}

#[test]
fn the_output_ring_is_bounded_and_counts_what_it_dropped() -> TestResult {
    use stacyvm_agent::procs::{ProcInfo, RING_BYTES};
    let agent = Agent::start();
    let mut c = agent.connect();
    // 3 MiB of output on stdout.
    let info: ProcInfo = c.ok(&start_req(&[
        "sh",
        "-c",
        "head -c 3145728 /dev/zero | tr '\\0' x",
    ]))?;
    // Read only after the exit: a reader following live output would keep up.
    for _ in 0..3000 {
        let now: ProcInfo = c.ok(&Request::ProcGet { pid: info.pid })?;
        if now.state == "exited" {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let (out, _, exit) = c.proc_output(info.pid, true)?;
    let exit = exit.expect("an exit");
    assert_eq!(exit.status.exit_code, Some(0));
    assert_eq!(out.len(), RING_BYTES);
    assert_eq!(exit.stdout_dropped, 3 * 1024 * 1024 - RING_BYTES as u64);
    Ok(())
}

#[test]
fn running_background_processes_are_capped() -> TestResult {
    use stacyvm_agent::procs::{ProcInfo, MAX_RUNNING};
    let agent = Agent::start();
    let mut c = agent.connect();
    let mut pids = Vec::new();
    for _ in 0..MAX_RUNNING {
        let info: ProcInfo = c.ok(&start_req(&["sleep", "600"]))?;
        pids.push(info.pid);
    }
    assert_eq!(
        code(&c.ok::<ProcInfo>(&start_req(&["sleep", "600"]))),
        "conflict"
    );
    for pid in &pids {
        let _: ProcInfo = c.ok(&Request::ProcSignal {
            pid: *pid,
            signal: "KILL".into(),
        })?;
    }
    for pid in pids {
        let (_, _, exit) = c.proc_output(pid, true)?;
        assert_eq!(exit.expect("an exit").status.signal, Some(libc::SIGKILL));
    }
    let info: ProcInfo = c.ok(&start_req(&["true"]))?;
    assert!(info.pid > 0);
    Ok(())
}
