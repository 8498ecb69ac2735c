//! The Kubernetes manifests in `deploy/kubernetes` agree with each other and with this
//! binary: `tests/python/check_deploy.py` parses them and checks kinds and API versions,
//! that the kustomization lists every file, that the Service and InferencePool select
//! the Deployment's pods, that ports, gRPC probes and the InferencePool's target port
//! match the `--listen`/`--http-listen` args, that every flag in the container's args is
//! one `multilora serve --help` lists (with values of the right form), that the memory
//! budgets fit the limits, that the termination grace period outlasts the drain, that a
//! tenants file is given and it and any TLS files are on read-only mounts (with probes
//! that can reach a TLS port), and that no two replicas share a `--state-dir`.
//! `tests/python/check_deploy_refusals.py` shows the checker refuses each of those
//! mistakes in an edited copy of the manifests.

mod common;

use common::python::run_python;

/// Runs `script` over deploy/kubernetes and this binary; it must say ok.
async fn check(script: &str) {
    let deploy = common::repo_path("deploy/kubernetes");
    let args = [
        "--binary",
        env!("CARGO_BIN_EXE_multilora"),
        "--deploy",
        deploy.to_str().unwrap(),
    ];
    let stdout = run_python(script, args).await;
    assert!(stdout.starts_with("ok: "), "unexpected output:\n{stdout}");
}

#[tokio::test]
#[ignore = "needs the Python venv: make test"]
async fn deploy_manifests_match_the_binary() {
    check("tests/python/check_deploy.py").await;
}

#[tokio::test]
#[ignore = "needs the Python venv: make test"]
async fn the_manifest_checker_refuses_open_or_shared_state_deployments() {
    check("tests/python/check_deploy_refusals.py").await;
}
