use super::*;

const FILE: &str = r#"
[[tenant]]
name = "acme"
api_key_sha256 = ["DIGEST_A"]
adapters = ["acme-*", "shared"]
manage_adapters = true
weight = 3

[[tenant]]
name = "globex"
api_key_sha256 = ["DIGEST_B"]
adapters = ["globex-sql"]
base_model = false
max_concurrent_requests = 2
"#;

fn tenants() -> Tenants {
    let text = FILE
        .replace("DIGEST_A", &key_digest("key-a"))
        .replace("DIGEST_B", &key_digest("key-b").to_uppercase());
    Tenants::from_toml(&text).unwrap()
}

fn auth(t: &Tenants, value: &str) -> Result<Arc<Tenant>, RequestError> {
    t.authenticate(Some(value.as_bytes()))
}

#[test]
fn keys_are_known_by_their_digest_only() {
    assert_eq!(
        key_digest("abc"),
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    );
    let t = tenants();
    assert_eq!(auth(&t, "Bearer key-a").unwrap().name(), "acme");
    assert_eq!(auth(&t, "bearer  key-b ").unwrap().name(), "globex");
    assert_eq!(auth(&t, "Bearer key-a").unwrap().share.weight, 3.0);
    for bad in ["Bearer key-c", "key-a", "Basic key-a", "Bearer ", ""] {
        let e = auth(&t, bad).unwrap_err();
        assert!(
            matches!(e, RequestError::Unauthenticated(_)),
            "{bad}: {e:?}"
        );
    }
    assert!(matches!(
        t.authenticate(None),
        Err(RequestError::Unauthenticated(_))
    ));
    assert!(!t.is_open());
}

#[test]
fn adapters_by_name_or_prefix_and_the_base_model_by_flag() {
    let t = tenants();
    let acme = auth(&t, "Bearer key-a").unwrap();
    let globex = auth(&t, "Bearer key-b").unwrap();
    assert!(acme.check_adapters(["acme-chat", "shared"]).is_ok());
    assert!(acme.check_adapters([]).is_ok());
    assert!(acme.check_manage().is_ok());
    let denied = |r: Result<(), RequestError>| matches!(r, Err(RequestError::PermissionDenied(_)));
    assert!(denied(acme.check_adapters(["globex-sql"])));
    assert!(denied(acme.check_adapters(["acme-chat", "shared2"])));
    assert!(denied(globex.check_adapters(["globex-sql2"])));
    assert!(denied(globex.check_adapters([])));
    assert!(denied(globex.check_manage()));
    // One message whether the adapter exists or not: it names only what was asked.
    let e = acme
        .check_adapters(["x".repeat(10_000).as_str()])
        .unwrap_err();
    assert!(e.to_string().len() < 200, "{e}");
}

#[test]
fn an_open_server_has_one_anonymous_tenant_allowed_everything() {
    let t = Tenants::open();
    assert!(t.is_open());
    let anyone = t.authenticate(None).unwrap();
    assert_eq!(anyone.name(), "");
    assert!(anyone.check_adapters(["whatever"]).is_ok());
    assert!(anyone.check_manage().is_ok());
    assert_eq!(t.all().len(), 1);
}

#[test]
fn bad_files_are_refused_with_the_reason() {
    let digest = key_digest("k");
    let cases = [
        ("", "no [[tenant]]"),
        ("[[tenant]]\nname = \"a\"\napi_key_sha256 = [\"abc\"]", "not a SHA-256"),
        ("[[tenant]]\nname = \"a\"\napi_key_sha256 = []", "no api_key_sha256"),
        (
            &format!("[[tenant]]\nname = \"a\"\napi_key_sha256 = [\"{digest}\"]\nweight = 0"),
            "weight",
        ),
        (
            &format!(
                "[[tenant]]\nname = \"a\"\napi_key_sha256 = [\"{digest}\"]\n\
                 [[tenant]]\nname = \"b\"\napi_key_sha256 = [\"{digest}\"]"
            ),
            "used twice",
        ),
        (
            &format!("[[tenant]]\nname = \"a\"\napi_key_sha256 = [\"{digest}\"]\nkey = \"k\""),
            "unknown field",
        ),
        (
            &format!(
                "[[tenant]]\nname = \"a\"\napi_key_sha256 = [\"{digest}\"]\nmax_concurrent_requests = 0"
            ),
            "limit of 0",
        ),
    ];
    for (text, want) in cases {
        let e = format!("{:#}", Tenants::from_toml(text).unwrap_err());
        assert!(e.contains(want), "{text:?}: {e}");
    }
}
