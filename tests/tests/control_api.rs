//! The control plane's own surface: unknown API paths, and what its data directory lets other
//! users read.
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use weft_tests::*;

/// Status and content type of a request to `path` on the control plane.
fn status_and_type(control: &Control, path: &str, bearer: Option<&str>) -> (u16, String) {
    let cacert = control.ca_file();
    let url = format!("https://{}{path}", control.addr);
    let auth = bearer.map(|b| format!("authorization: Bearer {b}")).unwrap_or_default();
    let mut args =
        vec!["-s", "-o", "/dev/null", "--max-time", "5", "--path-as-is", "--cacert", cacert.to_str().unwrap()];
    args.extend(["-w", "%{http_code} %{content_type}"]);
    if bearer.is_some() {
        args.extend(["-H", auth.as_str()]);
    }
    args.push(&url);
    let out = stdout(&run("curl", &args));
    let (code, ctype) = out.split_once(' ').unwrap_or((&out, ""));
    (code.parse().unwrap_or(0), ctype.to_owned())
}

#[test]
fn misspelled_api_paths_are_not_found_with_or_without_the_admin_credential() {
    let dir = TestDir::new("api-404");
    let control = Control::start(&dir);
    let admin = control.admin_token();
    assert_eq!(status_and_type(&control, "/api/v1/tokens", Some(&admin)).0, 200);
    for path in ["/api/v1/tokens/", "/API/v1/tokens", "/api/v1/%74okens", "/api/v1/nothing", "/nothing"] {
        for bearer in [Some(admin.as_str()), None] {
            let (status, ctype) = status_and_type(&control, path, bearer);
            assert_eq!(status, 404, "{path} (admin credential: {})", bearer.is_some());
            assert!(ctype.starts_with("application/json"), "{path}: {ctype}");
        }
    }
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

/// Every directory and file under `dir`, with its mode.
fn modes(dir: &Path) -> Vec<(String, u32)> {
    let mut out = vec![(dir.display().to_string(), mode(dir))];
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(modes(&p));
        } else {
            out.push((p.display().to_string(), mode(&p)));
        }
    }
    out
}

fn assert_owner_only(dir: &Path) {
    let all = modes(dir);
    assert!(all.iter().any(|(p, _)| p.ends_with("weft.redb")), "{all:?}");
    assert!(all.iter().any(|(p, _)| p.ends_with("root.key")), "{all:?}");
    for (p, m) in &all {
        let want = if Path::new(p).is_dir() { 0o700 } else { 0o600 };
        assert_eq!(*m, want, "{p} has mode {m:o}");
    }
}

#[test]
fn the_data_directory_is_owner_only_and_an_existing_one_is_made_so() {
    let dir = TestDir::new("data-perms");
    let mut control = Control::start(&dir);
    let data = control.data_dir.clone();
    assert_owner_only(&data);
    // A data directory an older version (or a loose umask) left readable by others.
    assert_eq!(control.proc.stop(), Some(0));
    std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(data.join("ca"), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(data.join("weft.redb"), std::fs::Permissions::from_mode(0o644)).unwrap();
    std::fs::set_permissions(data.join("admin.token"), std::fs::Permissions::from_mode(0o644)).unwrap();
    let control = Control::start_at(&dir, &control.addr.clone(), data.clone());
    assert_owner_only(&data);
    assert!(control.api("/api/v1/services").is_some());
}
