//! Creates a sandbox, runs a command, streams another, moves a file in and
//! out, and removes the sandbox. Run against a server with
//! `STACYVM_URL=… STACYVM_API_KEY=… cargo run -p stacyvm-sdk --example quickstart [IMAGE]`.

use futures_util::StreamExt;
use stacyvm_sdk::{Client, CreateSandbox, ExecEvent, ExecRequest};

#[tokio::main]
async fn main() -> stacyvm_sdk::Result<()> {
    let image = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "busybox".to_owned());
    let client = Client::from_env()?;
    let sbx = client.sandbox_create(&CreateSandbox::image(image)).await?;
    println!("created {} on {}", sbx.id, sbx.provider);

    // The sandbox is removed whatever happens below.
    let result = run(&client, &sbx.id).await;
    client.sandbox_destroy(&sbx.id).await?;
    result
}

async fn run(client: &Client, id: &str) -> stacyvm_sdk::Result<()> {
    let out = client.exec(id, &ExecRequest::new(["uname", "-a"])).await?;
    print!("uname: {}", out.stdout_text());

    let script = "for i in 1 2 3; do echo tick $i; sleep 1; done; echo done >&2";
    let mut events = client.exec_stream(id, &ExecRequest::shell(script)).await?;
    while let Some(ev) = events.next().await {
        match ev? {
            ExecEvent::Stdout(b) => print!("out: {}", String::from_utf8_lossy(&b)),
            ExecEvent::Stderr(b) => eprint!("err: {}", String::from_utf8_lossy(&b)),
            ExecEvent::Exit(st) => println!("exit code {}", st.shell_code()),
        }
    }

    client
        .file_write_bytes(id, "/work/hello.txt", "hello from the host\n", None)
        .await?;
    let back = client.file_read_bytes(id, "/work/hello.txt").await?;
    print!("read back: {}", String::from_utf8_lossy(&back));
    for e in client.file_list(id, "/work", false).await? {
        println!("{} {:>8} {}", e.mode, e.size, e.path);
    }
    Ok(())
}
