//! A counting, fault-injecting endpoint in front of moto, on loopback: every Secrets Manager HTTP
//! request the operator's AWS SDK sends is counted here (by operation, with its time and answer),
//! so tests assert call rates and counts at the endpoint, SDK retries included. STS calls are
//! counted apart (and can be denied); other services pass through untouched. It can grant only a quota
//! (answering `ThrottlingException` above it, like an account's rate limit), throttle everything,
//! answer 503 as an unavailable service would, deny an operation, or hold back one secret's reads.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response, StatusCode};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::sync::oneshot;

/// How the endpoint answers.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Mode {
    /// Forward everything to moto.
    Pass,
    /// Forward at most this many requests per fixed one-second window; throttle the rest.
    Quota(u32),
    /// Answer every request with `ThrottlingException`.
    Throttle,
    /// Answer every request with 503 Service Unavailable.
    Unavailable,
}

/// One request seen.
#[derive(Debug, Clone)]
pub struct Seen {
    pub at: Instant,
    /// The access key the request was signed with (`Credential=` of its Authorization header).
    pub access_key: String,
    /// `X-Amz-Target`'s service and operation, e.g. `secretsmanager` and `GetSecretValue`.
    pub service: String,
    pub operation: String,
    pub forwarded: bool,
    /// The request body (Secrets Manager requests carry ids, never values, in their bodies).
    pub body: String,
}

#[derive(Debug)]
struct State {
    mode: Mode,
    seen: Vec<Seen>,
    window: (Instant, u32),
    /// Value reads (GetSecretValue, BatchGetSecretValue) whose request names this are held back
    /// this long before they are forwarded: one slow secret.
    slow_reads: Option<(String, Duration)>,
    /// Operations answered `AccessDeniedException` (a role without that permission); STS
    /// operations (`AssumeRole`) are answered STS's `AccessDenied`.
    /// With the error code each is answered (`AccessDeniedException`, `DecryptionFailure`, ...).
    denied: Vec<(String, &'static str)>,
    /// STS calls seen (`AssumeRole`, `GetCallerIdentity`, ...).
    sts_seen: Vec<String>,
    /// Secrets whose value reads are refused with `AccessDeniedException` (a resource policy or
    /// KMS key that denies the role this one secret): a GetSecretValue answered so, and inside a
    /// BatchGetSecretValue answer the secret moved from `SecretValues` to `Errors`.
    refused_secrets: Vec<String>,
    /// `Errors[]` entries this endpoint put into batch answers.
    refused_in_batches: usize,
    /// Value reads that ask for one of these ids are held until [`CountingEndpoint::release_reads`]:
    /// work provably still queued when a test injects a fault.
    held_ids: Vec<String>,
    /// Reads being held right now.
    held_now: usize,
    /// Set to true to let every held read go.
    released: tokio::sync::watch::Sender<bool>,
    /// The role sessions STS handed out through this endpoint.
    sessions: Vec<Session>,
    /// IAM as AWS would evaluate it: Secrets Manager calls allowed only as these policies say.
    iam: Option<Iam>,
}

/// A role session STS handed out: for whom, with which tags, under which access key.
#[derive(Debug, Clone, PartialEq)]
pub struct Session {
    pub access_key: String,
    pub role_arn: String,
    pub session_name: String,
    pub tags: std::collections::BTreeMap<String, String>,
}

/// The policies the endpoint holds Secrets Manager calls to: `sessions` for calls signed by a
/// role session STS handed out here (its tags fill `${aws:PrincipalTag/...}`), `own` for the
/// operator's own credentials.
#[derive(Debug, Clone)]
pub struct Iam {
    pub sessions: super::iam::Policy,
    pub own: super::iam::Policy,
}

pub struct CountingEndpoint {
    pub url: String,
    state: Arc<Mutex<State>>,
    _stop: oneshot::Sender<()>,
}

fn lock(state: &Mutex<State>) -> std::sync::MutexGuard<'_, State> {
    state
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl CountingEndpoint {
    /// Starts in front of `upstream` (moto's URL); stops when dropped.
    pub async fn start(upstream: &str, mode: Mode) -> Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}", listener.local_addr()?);
        let upstream: hyper::Uri = upstream.parse().context("upstream URL")?;
        let state = Arc::new(Mutex::new(State {
            mode,
            seen: Vec::new(),
            window: (Instant::now(), 0),
            slow_reads: None,
            denied: Vec::new(),
            sts_seen: Vec::new(),
            refused_secrets: Vec::new(),
            refused_in_batches: 0,
            held_ids: Vec::new(),
            held_now: 0,
            released: tokio::sync::watch::Sender::new(false),
            sessions: Vec::new(),
            iam: None,
        }));
        let client: Client<HttpConnector, Full<Bytes>> =
            Client::builder(TokioExecutor::new()).build_http();
        let (stop, mut stopped) = oneshot::channel::<()>();
        let served = state.clone();
        tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    _ = &mut stopped => return,
                    accepted = listener.accept() => accepted,
                };
                let Ok((stream, _)) = accepted else { continue };
                let (state, client, upstream) = (served.clone(), client.clone(), upstream.clone());
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |request| {
                        answer(request, state.clone(), client.clone(), upstream.clone())
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Ok(Self {
            url,
            state,
            _stop: stop,
        })
    }

    /// Holds every Secrets Manager call to `iam`, as AWS would: a call it does not allow is
    /// answered `AccessDeniedException` (in a batch, the secret moves to `Errors`).
    pub fn enforce(&self, iam: Iam) {
        lock(&self.state).iam = Some(iam);
    }

    /// The role sessions STS handed out so far.
    pub fn sessions(&self) -> Vec<Session> {
        lock(&self.state).sessions.clone()
    }

    pub fn set_mode(&self, mode: Mode) {
        lock(&self.state).mode = mode;
    }

    /// Holds back every value read whose request names `secret` by `delay` (the others pass).
    pub fn slow_reads_of(&self, secret: &str, delay: Duration) {
        lock(&self.state).slow_reads = Some((secret.to_string(), delay));
    }

    /// Answers `operation` with `AccessDeniedException` from now on.
    pub fn deny(&self, operation: &str) {
        self.deny_with(operation, "AccessDeniedException");
    }

    /// Answers `operation` with the error `code` from now on (e.g. `DecryptionFailure`, what
    /// Secrets Manager answers a read when KMS denies the key).
    pub fn deny_with(&self, operation: &str, code: &'static str) {
        lock(&self.state).denied.push((operation.to_string(), code));
    }

    /// Forgets every [`Self::deny`]: the role is fixed.
    pub fn allow_all(&self) {
        lock(&self.state).denied.clear();
    }

    /// Holds every value read that asks for `id` (exactly) until [`Self::release_reads`].
    pub fn hold_reads_of(&self, id: &str) {
        let mut state = lock(&self.state);
        state.held_ids.push(id.to_string());
        state.released.send_replace(false);
    }

    /// Lets every held read go on to moto, and holds no more.
    pub fn release_reads(&self) {
        let mut state = lock(&self.state);
        state.held_ids.clear();
        state.released.send_replace(true);
    }

    /// Waits until a held read has arrived (and is being held).
    pub async fn wait_read_held(&self) -> Result<()> {
        xtask::support::wait_for("a held read to arrive", super::TIMEOUT, || async {
            anyhow::ensure!(self.reads_held() >= 1, "none held yet");
            Ok(())
        })
        .await
    }

    /// Reads being held at this moment.
    pub fn reads_held(&self) -> usize {
        lock(&self.state).held_now
    }

    /// Refuses every value read of the secret named `name` (its name, not its ARN) from now on,
    /// also as one `Errors[]` entry inside a batch answer that reads it with others.
    pub fn refuse_reads_of(&self, name: &str) {
        lock(&self.state).refused_secrets.push(name.to_string());
    }

    /// Refuses no value reads from now on (the resource policy fixed).
    pub fn allow_reads(&self) {
        lock(&self.state).refused_secrets.clear();
    }

    /// How many `Errors[]` entries this endpoint has put into BatchGetSecretValue answers.
    pub fn refused_in_batches(&self) -> usize {
        lock(&self.state).refused_in_batches
    }

    /// Secrets Manager requests seen so far that ask for one of `ids` (a name or an ARN, exactly as
    /// Secrets Manager would read it): as `SecretId`, in `SecretIdList`, or as a filter value.
    pub fn requests_for(&self, ids: &[String]) -> Vec<Seen> {
        lock(&self.state)
            .seen
            .iter()
            .filter(|seen| {
                requested_ids(&seen.body)
                    .iter()
                    .any(|asked| ids.iter().any(|id| id == asked))
            })
            .cloned()
            .collect()
    }

    /// STS calls of `operation` seen so far.
    pub fn sts_count(&self, operation: &str) -> usize {
        lock(&self.state)
            .sts_seen
            .iter()
            .filter(|seen| *seen == operation)
            .count()
    }

    /// Every request seen so far.
    pub fn seen(&self) -> Vec<Seen> {
        lock(&self.state).seen.clone()
    }

    /// Requests seen so far, of `operation` (or all with `None`).
    pub fn count(&self, operation: Option<&str>) -> usize {
        lock(&self.state)
            .seen
            .iter()
            .filter(|seen| operation.is_none_or(|op| seen.operation == op))
            .count()
    }

    /// The most requests seen in any `window` (sliding) since `since`, as a rate per second.
    pub fn peak_rate(&self, since: Instant, window: Duration) -> f64 {
        let times: Vec<Instant> = lock(&self.state)
            .seen
            .iter()
            .map(|seen| seen.at)
            .filter(|at| *at >= since)
            .collect();
        let mut most = 0;
        let mut start = 0;
        for (end, at) in times.iter().enumerate() {
            while at.duration_since(times[start]) >= window {
                start += 1;
            }
            most = most.max(end + 1 - start);
        }
        most as f64 / window.as_secs_f64()
    }

    /// `BINARY run --namespace NAMESPACE` as its own process: the test environment's cluster as
    /// `kubeconfig` says (the chart's ServiceAccount: [`super::operator_kubeconfig`]), its AWS
    /// credentials, Secrets Manager through this endpoint, its servers on free loopback ports.
    pub fn operator_command(
        &self,
        binary: &std::path::Path,
        namespace: &str,
        kubeconfig: &std::path::Path,
    ) -> std::process::Command {
        let mut command = std::process::Command::new(binary);
        command
            .args(["run", "--namespace", namespace])
            .args(["--metrics-address", "127.0.0.1:0"])
            .args(["--health-address", "127.0.0.1:0"])
            .env("RUST_LOG", "warn")
            // The operator's own namespace (its integrity key's Secret), as the chart sets it.
            .env("POD_NAMESPACE", namespace)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        // To see why a test failed: MTLS_TEST_OPERATOR_LOG=DIR appends the operator's log to
        // DIR/NAMESPACE.log, at the level MTLS_TEST_OPERATOR_RUST_LOG gives (default: info).
        if let Some(dir) = std::env::var_os("MTLS_TEST_OPERATOR_LOG") {
            let path = std::path::Path::new(&dir).join(format!("{namespace}.log"));
            let file = std::fs::create_dir_all(&dir).and_then(|()| {
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&path)
            });
            if let Ok(file) = file {
                let level = std::env::var("MTLS_TEST_OPERATOR_RUST_LOG")
                    .unwrap_or_else(|_| "info".to_string());
                command.stderr(file).env("RUST_LOG", level);
            }
        }
        for (name, value) in xtask::support::environment().variables() {
            command.env(name, value);
        }
        command.env("AWS_ENDPOINT_URL", &self.url);
        command.env("KUBECONFIG", kubeconfig);
        command
    }

    /// An SDK configuration like `base`, with this endpoint in front of moto.
    pub fn aws_config(&self, base: &aws_config::SdkConfig) -> aws_config::SdkConfig {
        base.to_builder().endpoint_url(&self.url).build()
    }
}

async fn answer(
    request: Request<Incoming>,
    state: Arc<Mutex<State>>,
    client: Client<HttpConnector, Full<Bytes>>,
    upstream: hyper::Uri,
) -> Result<Response<Full<Bytes>>, hyper::Error> {
    let (service, operation) = request
        .headers()
        .get("x-amz-target")
        .and_then(|value| value.to_str().ok())
        .and_then(|target| target.split_once('.'))
        .map(|(service, operation)| (service.to_ascii_lowercase(), operation.to_string()))
        .unwrap_or_default();
    let (access_key, signed_region) = signer(&request);
    let (parts, body) = request.into_parts();
    let body = body.collect().await?.to_bytes();
    // STS speaks the query protocol: the operation is the form's `Action`.
    if service.is_empty()
        && let Some(action) = form_action(&body)
    {
        let denied = {
            let mut state = lock(&state);
            state.sts_seen.push(action.clone());
            state.denied.iter().any(|(denied, _)| *denied == action)
        };
        if denied {
            return Ok(sts_access_denied(&action));
        }
        let response = forward_bytes(parts, body.clone(), client, upstream).await?;
        if action != "AssumeRole" || !response.status().is_success() {
            return Ok(response);
        }
        return Ok(record_session(&state, &body, response).await);
    }
    // Secrets Manager calls only: SQS passes through, uncounted and unlimited.
    if service != "secretsmanager" {
        return forward_bytes(parts, body, client, upstream).await;
    }
    let now = Instant::now();
    let forward = {
        let mut state = lock(&state);
        let denied = state
            .denied
            .iter()
            .find(|(denied, _)| *denied == operation)
            .map(|(_, code)| *code);
        let forward = match (denied, state.mode) {
            (Some(code), _) => Err(error_answer(code)),
            (None, Mode::Pass) => Ok(()),
            (None, Mode::Throttle) => Err(throttled()),
            (None, Mode::Unavailable) => Err(unavailable()),
            (None, Mode::Quota(per_second)) => {
                let (started, count) = &mut state.window;
                if now.duration_since(*started) >= Duration::from_secs(1) {
                    *started = now;
                    *count = 0;
                }
                if *count < per_second {
                    *count += 1;
                    Ok(())
                } else {
                    Err(throttled())
                }
            }
        };
        let is_read = matches!(operation.as_str(), "GetSecretValue" | "BatchGetSecretValue");
        let text = String::from_utf8_lossy(&body).into_owned();
        // IAM: the whole call, then (in a batch) each secret as a GetSecretValue of its own.
        let (iam_allows, iam_refused) = match &state.iam {
            None => (true, Vec::new()),
            Some(iam) => {
                let session = state.sessions.iter().find(|s| s.access_key == access_key);
                let (policy, tags) = match session {
                    Some(session) => (&iam.sessions, session.tags.clone()),
                    None => (&iam.own, Default::default()),
                };
                let allows = |action: &str, resource: &str| {
                    policy.allows(&tags, &format!("secretsmanager:{action}"), resource)
                };
                let ids = requested_ids(&text);
                match operation.as_str() {
                    "GetSecretValue" | "DescribeSecret" => (
                        ids.iter()
                            .all(|id| allows(&operation, &secret_arn(&signed_region, id))),
                        Vec::new(),
                    ),
                    "BatchGetSecretValue" => (
                        allows(&operation, "*"),
                        ids.into_iter()
                            .filter(|id| !allows("GetSecretValue", &secret_arn(&signed_region, id)))
                            .collect(),
                    ),
                    _ => (allows(&operation, "*"), Vec::new()),
                }
            }
        };
        let refused_single = operation == "GetSecretValue"
            && state
                .refused_secrets
                .iter()
                .any(|secret| text.contains(secret.as_str()));
        let delay = state
            .slow_reads
            .as_ref()
            .filter(|(secret, _)| {
                is_read && String::from_utf8_lossy(&body).contains(secret.as_str())
            })
            .map(|(_, delay)| *delay);
        let forward = match forward {
            Ok(()) if refused_single || !iam_allows => Err(access_denied()),
            other => other,
        };
        let batch = operation == "BatchGetSecretValue";
        let held = (is_read
            && requested_ids(&text)
                .iter()
                .any(|id| state.held_ids.contains(id)))
        .then(|| state.released.subscribe());
        state.held_now += usize::from(held.is_some());
        state.seen.push(Seen {
            at: now,
            access_key: access_key.clone(),
            service,
            operation,
            forwarded: forward.is_ok(),
            body: text,
        });
        let mut refused = state.refused_secrets.clone();
        refused.extend(iam_refused);
        forward.map(|()| (delay, batch, held, refused))
    };
    match forward {
        Err(refused) => Ok(refused),
        Ok((delay, batch, held, refused)) => {
            if let Some(delay) = delay {
                tokio::time::sleep(delay).await;
            }
            if let Some(mut released) = held {
                // Counted down however the wait ends: released, or dropped with its connection.
                let _held = HeldRead(state.clone());
                let _ = released.wait_for(|released| *released).await;
            }
            let response = forward_bytes(parts, body, client, upstream).await?;
            Ok(if batch {
                refuse_in_batch(response, &state, refused).await
            } else {
                response
            })
        }
    }
}

/// One read being held: counted in `held_now` while it lives.
struct HeldRead(Arc<Mutex<State>>);

impl Drop for HeldRead {
    fn drop(&mut self) {
        lock(&self.0).held_now -= 1;
    }
}

/// A BatchGetSecretValue answer with each refused secret moved from `SecretValues` to `Errors`,
/// as Secrets Manager answers a batch in which the role may read all but one secret.
async fn refuse_in_batch(
    response: Response<Full<Bytes>>,
    state: &Mutex<State>,
    refused: Vec<String>,
) -> Response<Full<Bytes>> {
    if refused.is_empty() || !response.status().is_success() {
        return response;
    }
    let (parts, body) = response.into_parts();
    let bytes = match body.collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(never) => match never {},
    };
    let Ok(mut answer) = serde_json::from_slice::<serde_json::Value>(&bytes) else {
        return Response::from_parts(parts, Full::new(bytes));
    };
    let values = answer["SecretValues"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    // Asked for by name or by ARN.
    let (out, kept): (Vec<_>, Vec<_>) = values.into_iter().partition(|value| {
        ["Name", "ARN"].iter().any(|field| {
            value[*field]
                .as_str()
                .is_some_and(|id| refused.iter().any(|secret| secret == id))
        })
    });
    if out.is_empty() {
        return Response::from_parts(parts, Full::new(bytes));
    }
    lock(state).refused_in_batches += out.len();
    let mut errors = answer["Errors"].as_array().cloned().unwrap_or_default();
    errors.extend(out.iter().map(|value| {
        serde_json::json!({
            "SecretId": value["Name"],
            "ErrorCode": "AccessDeniedException",
            "Message": "not authorized to perform secretsmanager:GetSecretValue on this resource",
        })
    }));
    answer["SecretValues"] = serde_json::Value::Array(kept);
    answer["Errors"] = serde_json::Value::Array(errors);
    let body = Bytes::from(answer.to_string());
    let mut parts = parts;
    parts.headers.remove(hyper::header::CONTENT_LENGTH);
    Response::from_parts(parts, Full::new(body))
}

/// The secret ids a Secrets Manager request body asks for: `SecretId`, `SecretIdList[]` and every
/// `Filters[].Values[]` (a name filter's value is a name or a prefix of one).
fn requested_ids(body: &str) -> Vec<String> {
    let Ok(request) = serde_json::from_str::<serde_json::Value>(body) else {
        return Vec::new();
    };
    let text = |value: &serde_json::Value| value.as_str().map(str::to_string);
    let mut ids: Vec<String> = text(&request["SecretId"]).into_iter().collect();
    for listed in request["SecretIdList"].as_array().into_iter().flatten() {
        ids.extend(text(listed));
    }
    for filter in request["Filters"].as_array().into_iter().flatten() {
        for value in filter["Values"].as_array().into_iter().flatten() {
            ids.extend(text(value));
        }
    }
    ids
}

/// The access key and region of a SigV4-signed request (`Credential=KEY/DATE/REGION/...`).
fn signer<B>(request: &Request<B>) -> (String, String) {
    let credential = request
        .headers()
        .get(hyper::header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.split("Credential=").nth(1))
        .unwrap_or_default();
    let mut scope = credential.split('/');
    let key = scope.next().unwrap_or_default().to_string();
    let region = scope.nth(1).unwrap_or_default().to_string();
    (key, region)
}

/// The ARN IAM evaluates for secret `id` (a name, or an ARN kept as it is) in moto's account.
fn secret_arn(region: &str, id: &str) -> String {
    if id.starts_with("arn:") {
        id.to_string()
    } else {
        // Secrets Manager appends six random characters to a secret's name in its ARN.
        format!("arn:aws:secretsmanager:{region}:123456789012:secret:{id}-AbCdEf")
    }
}

/// Records the session an AssumeRole answer hands out (its access key, the role, the session
/// name and the tags asked for) and passes the answer on.
async fn record_session(
    state: &Mutex<State>,
    request: &[u8],
    response: Response<Full<Bytes>>,
) -> Response<Full<Bytes>> {
    let (parts, body) = response.into_parts();
    let bytes = match body.collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(never) => match never {},
    };
    let answer = String::from_utf8_lossy(&bytes);
    let access_key = answer
        .split("<AccessKeyId>")
        .nth(1)
        .and_then(|rest| rest.split("</AccessKeyId>").next())
        .unwrap_or_default()
        .to_string();
    let form = form_fields(request);
    let field = |name: &str| form.get(name).cloned().unwrap_or_default();
    let tags = (1..)
        .map_while(|n| {
            let key = form.get(&format!("Tags.member.{n}.Key"))?;
            let value = form.get(&format!("Tags.member.{n}.Value"))?;
            Some((key.clone(), value.clone()))
        })
        .collect();
    lock(state).sessions.push(Session {
        access_key,
        role_arn: field("RoleArn"),
        session_name: field("RoleSessionName"),
        tags,
    });
    Response::from_parts(parts, Full::new(bytes))
}

/// The fields of a form-encoded (query protocol) body, percent-decoded.
fn form_fields(body: &[u8]) -> std::collections::HashMap<String, String> {
    let decode = |text: &str| {
        let bytes = text.as_bytes();
        let mut out = Vec::with_capacity(bytes.len());
        let mut i = 0;
        while i < bytes.len() {
            match bytes[i] {
                b'+' => out.push(b' '),
                b'%' if i + 2 < bytes.len() => {
                    let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("");
                    match u8::from_str_radix(hex, 16) {
                        Ok(byte) => {
                            out.push(byte);
                            i += 2;
                        }
                        Err(_) => out.push(b'%'),
                    }
                }
                byte => out.push(byte),
            }
            i += 1;
        }
        String::from_utf8_lossy(&out).into_owned()
    };
    String::from_utf8_lossy(body)
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .map(|(key, value)| (decode(key), decode(value)))
        .collect()
}

/// `Action=...` of a form-encoded (query protocol) request body.
fn form_action(body: &[u8]) -> Option<String> {
    form_fields(body).remove("Action")
}

/// STS's answer to an AssumeRole the role's trust policy does not allow (query protocol, XML).
fn sts_access_denied(action: &str) -> Response<Full<Bytes>> {
    let body = format!(
        "<ErrorResponse xmlns=\"https://sts.amazonaws.com/doc/2011-06-15/\"><Error>\
         <Type>Sender</Type><Code>AccessDenied</Code><Message>User: \
         arn:aws:sts::123456789012:assumed-role/operator/x is not authorized to perform: \
         sts:{action}</Message></Error><RequestId>0</RequestId></ErrorResponse>"
    );
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = StatusCode::FORBIDDEN;
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("text/xml"),
    );
    response
}

async fn forward_bytes(
    mut parts: hyper::http::request::Parts,
    body: Bytes,
    client: Client<HttpConnector, Full<Bytes>>,
    upstream: hyper::Uri,
) -> Result<Response<Full<Bytes>>, hyper::Error> {
    let path = parts
        .uri
        .path_and_query()
        .map_or("/", |path| path.as_str())
        .to_string();
    let mut target = upstream.clone().into_parts();
    target.path_and_query = path.parse().ok();
    parts.uri = hyper::Uri::from_parts(target).unwrap_or(upstream);
    let forwarded = Request::from_parts(parts, Full::new(body));
    match client.request(forwarded).await {
        Ok(response) => {
            let (parts, body) = response.into_parts();
            let body = body.collect().await?.to_bytes();
            Ok(Response::from_parts(parts, Full::new(body)))
        }
        Err(_) => Ok(unavailable()),
    }
}

/// Secrets Manager's answer to a call over the account's rate (awsJson1.1).
fn throttled() -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from_static(
        br#"{"__type":"ThrottlingException","message":"Rate exceeded"}"#,
    )));
    *response.status_mut() = StatusCode::BAD_REQUEST;
    response.headers_mut().insert(
        "x-amzn-errortype",
        hyper::header::HeaderValue::from_static("ThrottlingException"),
    );
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/x-amz-json-1.1"),
    );
    response
}

/// Secrets Manager's answer to a call the role may not make.
fn access_denied() -> Response<Full<Bytes>> {
    error_answer("AccessDeniedException")
}

/// A Secrets Manager error answer with `code`.
fn error_answer(code: &'static str) -> Response<Full<Bytes>> {
    let body =
        serde_json::json!({"__type": code, "message": "not authorized to perform this operation"});
    let mut response = Response::new(Full::new(Bytes::from(body.to_string())));
    *response.status_mut() = StatusCode::BAD_REQUEST;
    response.headers_mut().insert(
        "x-amzn-errortype",
        hyper::header::HeaderValue::from_static(code),
    );
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/x-amz-json-1.1"),
    );
    response
}

fn unavailable() -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from_static(b"")));
    *response.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
    response
}
