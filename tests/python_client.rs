//! The README's Python (grpcio) client runs against a live server on the real model, so
//! the example cannot rot.
mod common;

use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the real model and the Python venv: make test"]
async fn python_example_client_streams_a_completion() {
    let py = common::python::venv_python();
    let Started { server, .. } = TestServer::real().start().await;
    let addr = server.addr.to_string();
    let script = repo_path("examples/python/client.py");
    let out = tokio::process::Command::new(&py)
        .arg(&script)
        .args([
            "--addr",
            &addr,
            "--prompt",
            "The capital of France is",
            "--max-new-tokens",
            "8",
        ])
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "client failed:\n{stdout}\n{stderr}");
    // The reference completion of this prompt starts with " Paris." (fixtures/base.json).
    assert!(
        stdout.starts_with(" Paris."),
        "unexpected output:\n{stdout}"
    );
    assert!(stdout.contains("finish=FINISH_REASON_LENGTH"), "{stdout}");
    assert!(stdout.contains("completion_tokens=8"), "{stdout}");

    // Load a fixture adapter at runtime, then generate through it.
    let alpha = fixture_adapter("alpha-lora-r8-qv");
    let out = tokio::process::Command::new(&py)
        .arg(&script)
        .args([
            "--addr",
            &addr,
            "--max-new-tokens",
            "4",
            "--adapter",
            "alpha",
        ])
        .args(["--load", alpha.to_str().unwrap()])
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "client failed:\n{stdout}\n{stderr}");
    assert!(stdout.starts_with("loaded alpha version="), "{stdout}");
    assert!(stdout.contains("completion_tokens=4"), "{stdout}");
    assert!(!stdout.contains("adapter_version=0"), "{stdout}");
    server.stop().await.unwrap();
}
