//! A stand-in for the Hugging Face Hub's file-resolve API on 127.0.0.1, for the Hub
//! loading tests. It answers `GET /{owner}/{name}/resolve/{revision}/{file}` the way
//! hf-hub's sync client reads the Hub: a one-byte `Range` probe first (`X-Repo-Commit`,
//! `ETag`, `Content-Range: bytes 0-0/SIZE`), then the ranged download; `*.safetensors`
//! are LFS-like, a `302` (with `X-Linked-Etag`) to a `/cdn/{etag}` blob store on the same
//! server; errors carry the Hub's `X-Error-Code` (`RepoNotFound` with a 401,
//! `RevisionNotFound`, `EntryNotFound`). Repos hold commits (40-hex ids) and branch or
//! tag names pointing at them, changeable while serving. One request per connection
//! (`Connection: close`), one thread per connection; faults on demand: a connection
//! closed unanswered, or a body cut off halfway.
use std::collections::hash_map::DefaultHasher;
use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

/// A fault the server injects into every request until changed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Fault {
    /// Answer properly.
    #[default]
    None,
    /// Read the request, then close the connection without answering.
    CloseUnanswered,
    /// Send downloads (bodies longer than the one-byte probes) with their full
    /// `Content-Length` but only the first half of the bytes, then close.
    TruncateBodies,
}

/// One repo: commits and the names that point at them.
#[derive(Default)]
struct FakeRepo {
    /// Branch and tag names to commit ids.
    refs: HashMap<String, String>,
    /// Commit id to file name to bytes.
    commits: HashMap<String, HashMap<String, Vec<u8>>>,
}

impl FakeRepo {
    /// The commit a revision names: a branch or tag, or a commit id itself.
    fn resolve(&self, revision: &str) -> Option<String> {
        match self.refs.get(revision) {
            Some(sha) => Some(sha.clone()),
            None => self
                .commits
                .contains_key(revision)
                .then(|| revision.to_string()),
        }
    }
}

#[derive(Default)]
struct State {
    repos: Mutex<HashMap<String, FakeRepo>>,
    fault: Mutex<Fault>,
    requests: AtomicUsize,
    stop: AtomicBool,
}

/// The server; dropping it stops it and closes its port.
pub struct HubServer {
    addr: SocketAddr,
    state: Arc<State>,
    accept: Option<JoinHandle<()>>,
}

impl HubServer {
    /// Listens on an ephemeral port of 127.0.0.1 with no repos.
    pub fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(State::default());
        let shared = state.clone();
        let accept = std::thread::spawn(move || {
            for conn in listener.incoming() {
                if shared.stop.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(stream) = conn else { continue };
                let state = shared.clone();
                std::thread::spawn(move || handle(&state, addr, stream));
            }
        });
        Self {
            addr,
            state,
            accept: Some(accept),
        }
    }

    /// The URL to give as the Hub endpoint.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Adds commit `sha` with `files` to `repo` and points `revision` at it (a branch
    /// or tag; a revision equal to `sha` names the commit only). Publishing a branch
    /// again moves it.
    pub fn publish(&self, repo: &str, revision: &str, sha: &str, files: Vec<(String, Vec<u8>)>) {
        let mut repos = self.state.repos.lock().unwrap();
        let r = repos.entry(repo.to_string()).or_default();
        r.commits
            .insert(sha.to_string(), files.into_iter().collect());
        if revision != sha {
            r.refs.insert(revision.to_string(), sha.to_string());
        }
    }

    pub fn set_fault(&self, fault: Fault) {
        *self.state.fault.lock().unwrap() = fault;
    }

    /// Requests received so far.
    pub fn requests(&self) -> usize {
        self.state.requests.load(Ordering::SeqCst)
    }
}

impl Drop for HubServer {
    fn drop(&mut self) {
        self.state.stop.store(true, Ordering::SeqCst);
        // Wakes the accept loop, which then ends and drops the listener.
        let _ = TcpStream::connect(self.addr);
        if let Some(accept) = self.accept.take() {
            let _ = accept.join();
        }
    }
}

/// The files of a flat folder, as [`HubServer::publish`] takes them.
pub fn files_of(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        files.push((name, std::fs::read(&path).unwrap()));
    }
    files
}

/// The blob id the server gives `bytes` (the Hub uses git and LFS hashes).
pub fn etag_of(bytes: &[u8]) -> String {
    let mut h = DefaultHasher::new();
    bytes.hash(&mut h);
    format!("{:016x}{:08x}", h.finish(), bytes.len())
}

struct Request {
    path: String,
    /// `Range: bytes=START-[END]`.
    range: Option<(usize, Option<usize>)>,
}

struct Reply {
    status: &'static str,
    headers: Vec<(&'static str, String)>,
    body: Vec<u8>,
}

fn handle(state: &State, addr: SocketAddr, stream: TcpStream) {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
    let Some(request) = read_request(&stream) else {
        return;
    };
    state.requests.fetch_add(1, Ordering::SeqCst);
    let fault = *state.fault.lock().unwrap();
    if fault == Fault::CloseUnanswered {
        return;
    }
    let reply = route(state, addr, &request);
    let truncate = fault == Fault::TruncateBodies && reply.body.len() > 1;
    let _ = write_reply(stream, &reply, truncate);
}

fn read_request(stream: &TcpStream) -> Option<Request> {
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    reader.read_line(&mut line).ok()?;
    let path = line.split_whitespace().nth(1)?.to_string();
    let mut range = None;
    loop {
        line.clear();
        if reader.read_line(&mut line).ok()? == 0 {
            return None;
        }
        let header = line.trim_end();
        if header.is_empty() {
            break;
        }
        if let Some((name, value)) = header.split_once(':') {
            if name.eq_ignore_ascii_case("range") {
                let (start, end) = value.trim().strip_prefix("bytes=")?.split_once('-')?;
                range = Some((start.parse().ok()?, end.parse().ok()));
            }
        }
    }
    Some(Request { path, range })
}

fn write_reply(mut stream: TcpStream, reply: &Reply, truncate: bool) -> std::io::Result<()> {
    let mut head = format!("HTTP/1.1 {}\r\n", reply.status);
    for (name, value) in &reply.headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str(&format!(
        "Content-Length: {}\r\nConnection: close\r\n\r\n",
        reply.body.len()
    ));
    stream.write_all(head.as_bytes())?;
    let sent = if truncate {
        reply.body.len() / 2
    } else {
        reply.body.len()
    };
    stream.write_all(&reply.body[..sent])?;
    stream.flush()
}

fn route(state: &State, addr: SocketAddr, req: &Request) -> Reply {
    let repos = state.repos.lock().unwrap();
    if let Some(etag) = req.path.strip_prefix("/cdn/") {
        let blob = repos
            .values()
            .flat_map(|r| r.commits.values())
            .flat_map(|files| files.values())
            .find(|bytes| etag_of(bytes) == etag);
        return match blob {
            Some(bytes) => content(bytes, req.range, Vec::new()),
            None => error("404 Not Found", "", "no such blob"),
        };
    }
    let mut parts = req.path.trim_start_matches('/').splitn(5, '/');
    let (Some(owner), Some(name), Some("resolve"), Some(revision), Some(file)) = (
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
    ) else {
        return error("404 Not Found", "", "not a resolve URL");
    };
    let revision = revision.replace("%2F", "/");
    let Some(repo) = repos.get(&format!("{owner}/{name}")) else {
        return error("401 Unauthorized", "RepoNotFound", "Repository not found");
    };
    let Some(sha) = repo.resolve(&revision) else {
        let message = format!("Invalid rev id: {revision}");
        return error("404 Not Found", "RevisionNotFound", &message);
    };
    let commit = ("X-Repo-Commit", sha.clone());
    let Some(bytes) = repo.commits[&sha].get(file) else {
        let mut reply = error("404 Not Found", "EntryNotFound", "Entry not found");
        reply.headers.push(commit);
        return reply;
    };
    if file.ends_with(".safetensors") {
        let etag = etag_of(bytes);
        return Reply {
            status: "302 Found",
            headers: vec![
                commit,
                ("X-Linked-Etag", format!("\"{etag}\"")),
                ("X-Linked-Size", bytes.len().to_string()),
                ("Location", format!("http://{addr}/cdn/{etag}")),
            ],
            body: Vec::new(),
        };
    }
    content(bytes, req.range, vec![commit])
}

/// `bytes`, or the requested range of them, with their `ETag`.
fn content(
    bytes: &[u8],
    range: Option<(usize, Option<usize>)>,
    mut headers: Vec<(&'static str, String)>,
) -> Reply {
    headers.push(("ETag", format!("\"{}\"", etag_of(bytes))));
    let size = bytes.len();
    let Some((start, end)) = range else {
        return Reply {
            status: "200 OK",
            headers,
            body: bytes.to_vec(),
        };
    };
    let end = end.unwrap_or(usize::MAX).min(size.saturating_sub(1));
    if start >= size || start > end {
        headers.push(("Content-Range", format!("bytes */{size}")));
        return Reply {
            status: "416 Range Not Satisfiable",
            headers,
            body: Vec::new(),
        };
    }
    headers.push(("Content-Range", format!("bytes {start}-{end}/{size}")));
    Reply {
        status: "206 Partial Content",
        headers,
        body: bytes[start..=end].to_vec(),
    }
}

fn error(status: &'static str, code: &str, message: &str) -> Reply {
    let mut headers = vec![("X-Error-Message", message.to_string())];
    if !code.is_empty() {
        headers.push(("X-Error-Code", code.to_string()));
    }
    Reply {
        status,
        headers,
        body: message.as_bytes().to_vec(),
    }
}
