//! The deployment as files, checked by the tools that will read them: the Kubernetes overlays
//! (`deploy/k8s/`) rendered by `kubectl kustomize` and validated against the Kubernetes
//! schemas by `kubernetes-validate`; the alert rules (`deploy/prometheus/`) by `promtool`,
//! with their unit tests; the dashboard (`deploy/grafana/`) parsed, its queries by promtool's
//! PromQL parser.
//!
//! What no schema knows is checked against the binaries themselves: every variable a
//! manifest sets must be one its binary reads (from the binary's `--help`, where clap lists
//! `[env: NAME]`), with a value its own parser accepts (`api::Config`, `worker::Config`);
//! every setting whose default only suits a local cluster must be set; and every metric a
//! dashboard panel or a rule reads must be one the code emits.
//!
//! The tools are installed by `deploy/local/test`; a missing one fails with how to get it,
//! never a silent skip.

use std::{
    collections::{BTreeMap, BTreeSet},
    io::Write,
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
};

use clap::Parser;
use serde::Deserialize;
use serde_json::Value;

const REGIONS: [&str; 2] = ["sg", "eu"];

/// The oldest Kubernetes the manifests need (the api's `preStop` `sleep` is on by default from
/// 1.30), and the newest the validator knows.
const KUBERNETES_VERSIONS: [&str; 2] = ["1.30.0", "1.37.0"];

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the workspace")
        .to_path_buf()
}

/// Runs a tool, with `stdin` as its input; a tool that is not installed fails the test with
/// where it comes from.
fn run(tool: &str, args: &[&str], stdin: Option<&str>) -> Output {
    let mut child = Command::new(tool)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| {
            panic!(
                "{tool} cannot run ({e}): deploy/local/test installs it (kubectl comes with the \
                 machine, kubernetes-validate from PyPI, promtool from Debian's prometheus package)"
            )
        });
    let mut input = child.stdin.take().expect("stdin");
    if let Some(text) = stdin {
        input.write_all(text.as_bytes()).expect("write stdin");
    }
    drop(input);
    child.wait_with_output().expect("wait")
}

#[track_caller]
fn succeeded(what: &str, out: &Output) -> String {
    assert!(
        out.status.success(),
        "{what} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `kubectl kustomize` of a region's overlay: the YAML an SRE applies.
fn render(region: &str) -> String {
    let dir = repo().join("deploy/k8s/overlays").join(region);
    let out = run("kubectl", &["kustomize", dir.to_str().expect("path")], None);
    succeeded(&format!("kubectl kustomize {}", dir.display()), &out)
}

fn documents(yaml: &str) -> Vec<Value> {
    serde_norway::Deserializer::from_str(yaml)
        .map(|doc| Value::deserialize(doc).expect("a YAML document"))
        .filter(|v| !v.is_null())
        .collect()
}

fn find<'a>(docs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name} in the rendered overlay"))
}

/// `kubernetes-validate --strict`: fields the schema does not know are errors too.
fn validate(yaml: &str, version: &str) -> Output {
    run(
        "kubernetes-validate",
        &["--strict", "--quiet", "-k", version, "-"],
        Some(yaml),
    )
}

#[test]
fn every_region_renders_and_validates_against_the_kubernetes_schemas() {
    for region in REGIONS {
        let yaml = render(region);
        for version in KUBERNETES_VERSIONS {
            succeeded(
                &format!("kubernetes-validate of {region} against {version}"),
                &validate(&yaml, version),
            );
        }
        let kinds: BTreeSet<String> = documents(&yaml)
            .iter()
            .map(|d| d["kind"].as_str().expect("kind").to_owned())
            .collect();
        for kind in [
            "Namespace",
            "ConfigMap",
            "Secret",
            "Deployment",
            "Service",
            "HorizontalPodAutoscaler",
            "StatefulSet",
            "PodDisruptionBudget",
            "Job",
            "NetworkPolicy",
        ] {
            assert!(
                kinds.contains(kind),
                "{region} renders no {kind}: {kinds:?}"
            );
        }
    }
    // The validator refuses what a cluster would: a misspelled field, a wrong type.
    let yaml = render("sg");
    for (from, to) in [
        (
            "terminationGracePeriodSeconds:",
            "terminationGracePeriodSecond:",
        ),
        ("minReplicas: 2", "minReplicas: two"),
    ] {
        assert!(yaml.contains(from));
        let broken = yaml.replacen(from, to, 1);
        assert!(
            !validate(&broken, KUBERNETES_VERSIONS[1]).status.success(),
            "kubernetes-validate accepted {to}"
        );
    }
}

/// The worker's variables as the pod gets them: its `env` (the downward API's pod name for
/// GATEWAY_ID) over its ConfigMaps' (`envFrom`). Secrets are left out: their values are
/// placeholders here.
fn literal_env(docs: &[Value], container: &Value, pod_name: &str) -> BTreeMap<String, String> {
    let mut vars = BTreeMap::new();
    for from in container["envFrom"].as_array().into_iter().flatten() {
        if let Some(name) = from["configMapRef"]["name"].as_str() {
            for (k, v) in find(docs, "ConfigMap", name)["data"]
                .as_object()
                .expect("data")
            {
                vars.insert(k.clone(), v.as_str().expect("string").to_owned());
            }
        }
    }
    for e in container["env"].as_array().into_iter().flatten() {
        let name = e["name"].as_str().expect("name").to_owned();
        if let Some(v) = e["value"].as_str() {
            vars.insert(name, v.to_owned());
        } else if e["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name" {
            vars.insert(name, pod_name.to_owned());
        }
    }
    vars
}

#[test]
fn a_region_is_a_statefulset_whose_pods_are_its_gateways_and_only_a_scale_down_drains() {
    for region in REGIONS {
        let docs = documents(&render(region));
        let sts = find(&docs, "StatefulSet", &format!("gw-{region}"));
        let pod = &sts["spec"]["template"]["spec"];
        let worker = &pod["containers"][0];
        assert_eq!(
            worker["image"]
                .as_str()
                .map(|i| i.starts_with("gateway-worker")),
            Some(true)
        );
        let replicas = sts["spec"]["replicas"].as_u64().expect("replicas");
        let first = sts["spec"]["ordinals"]["start"].as_u64().unwrap_or(0);
        let pod_name = format!("gw-{region}-{first}");
        assert_eq!(first, 1, "gateway ids count from 1, as gw-sg-1");
        assert!(replicas >= 1);

        // The worker as it would start in the pod: the gateway id is the pod's name, the
        // region the overlay's, and the drain fits in the grace period.
        let vars = literal_env(&docs, worker, &pod_name);
        let cfg = parse_as::<worker::Config>("worker", &worker_help(), &vars)
            .unwrap_or_else(|e| panic!("the worker refuses its settings in {region}: {e}"));
        assert_eq!(cfg.gateway_id, pod_name);
        assert_eq!(cfg.region(), region);
        shared::session::validate_gateway_id(&cfg.gateway_id).expect("a valid gateway id");
        assert_eq!(shared::session::region_of_gateway(&cfg.gateway_id), region);
        let grace_ms = pod["terminationGracePeriodSeconds"]
            .as_u64()
            .expect("grace")
            * 1000;
        // A stop is a restart unless the StatefulSet no longer counts the pod: the preStop
        // decommissions those (gatewayctl, with the pod's account allowed to read the
        // StatefulSet), and the grace period outlasts its drain, the rest of the drain on
        // SIGTERM and the shutdown.
        let pre_stop = worker["lifecycle"]["preStop"]["exec"]["command"]
            .as_array()
            .expect("a preStop command")
            .iter()
            .filter_map(|a| a.as_str())
            .collect::<Vec<_>>()
            .join(" ");
        assert!(
            pre_stop.contains("gatewayctl gateways pre-stop \"$GATEWAY_ID\""),
            "{pre_stop}"
        );
        let pre_stop_ms = pre_stop
            .split("--timeout-secs ")
            .nth(1)
            .and_then(|t| t.split_whitespace().next()?.parse::<u64>().ok())
            .expect("the preStop's timeout")
            * 1000;
        assert!(
            grace_ms > pre_stop_ms + cfg.drain_grace_ms + cfg.shutdown_grace_ms,
            "terminationGracePeriodSeconds ({grace_ms} ms) must outlast the preStop's drain \
             ({pre_stop_ms} ms), the drain on SIGTERM ({} ms) and the shutdown ({} ms)",
            cfg.drain_grace_ms,
            cfg.shutdown_grace_ms
        );
        assert!(cfg.restart_hold_ms > 0, "a restart moves nothing");
        let account = pod["serviceAccountName"]
            .as_str()
            .expect("a service account");
        assert_eq!(pod["automountServiceAccountToken"], true);
        let binding = find(&docs, "RoleBinding", "gateway-worker-pre-stop");
        assert_eq!(binding["subjects"][0]["name"], account);
        let role = find(
            &docs,
            "Role",
            binding["roleRef"]["name"].as_str().expect("role"),
        );
        assert_eq!(role["rules"][0]["resources"][0], "statefulsets", "{role}");
        assert_eq!(role["rules"][0]["verbs"], serde_json::json!(["get"]));

        // Probes ask the worker's own endpoint, which it serves where WORKER_METRICS_LISTEN says.
        let listen = cfg.metrics_listen.expect("WORKER_METRICS_LISTEN is set");
        let port = worker["ports"]
            .as_array()
            .expect("ports")
            .iter()
            .find(|p| p["containerPort"].as_u64() == Some(u64::from(listen.port())))
            .expect("the metrics port is a container port");
        for (probe, path) in [
            ("startupProbe", "/healthz"),
            ("readinessProbe", "/readyz"),
            ("livenessProbe", "/healthz"),
        ] {
            let get = &worker[probe]["httpGet"];
            assert_eq!(get["path"], path, "{probe}");
            assert_eq!(get["port"], port["name"], "{probe}");
        }
        assert!(
            listen.ip().is_unspecified(),
            "reachable from the kubelet: {listen}"
        );

        let pdb = find(&docs, "PodDisruptionBudget", "gateway-worker");
        assert_eq!(pdb["spec"]["maxUnavailable"], 1);
        assert_eq!(
            pdb["spec"]["selector"]["matchLabels"],
            sts["spec"]["selector"]["matchLabels"]
        );

        // The api scales by its HPA and is probed on its own health endpoints.
        let hpa = find(&docs, "HorizontalPodAutoscaler", "gateway-api");
        assert_eq!(hpa["apiVersion"], "autoscaling/v2");
        assert_eq!(hpa["spec"]["scaleTargetRef"]["name"], "gateway-api");
        let api_deployment = find(&docs, "Deployment", "gateway-api");
        assert!(
            api_deployment["spec"]["replicas"].is_null(),
            "the HPA owns the count"
        );
        let api_pod = &api_deployment["spec"]["template"]["spec"];
        let api = &api_pod["containers"][0];
        assert_eq!(api["readinessProbe"]["httpGet"]["path"], "/readyz");
        assert_eq!(api["livenessProbe"]["httpGet"]["path"], "/healthz");
        let job = find(&docs, "Job", "gateway-migrate");
        assert_eq!(
            job["spec"]["template"]["spec"]["containers"][0]["command"],
            serde_json::json!(["gatewayctl", "migrate"])
        );
        // The migrate Job runs before the new version's pods: each waits in an init container
        // for the schema it needs, reading it as its own container does.
        for (pod, main) in [(api_pod, api), (pod, worker)] {
            let init = &pod["initContainers"][0];
            assert_eq!(
                init["command"],
                serde_json::json!(["gatewayctl", "schema-wait", "--timeout-secs", "600"])
            );
            assert_eq!(init["image"], main["image"]);
            let database_url = |c: &serde_json::Value| {
                c["env"]
                    .as_array()
                    .and_then(|e| e.iter().find(|v| v["name"] == "DATABASE_URL"))
                    .map(|v| v["valueFrom"].clone())
            };
            assert_eq!(database_url(init), database_url(main));
            assert!(database_url(init).is_some());
        }
    }
}

/// One setting as a binary's `--help` shows it.
#[derive(Debug, Clone)]
struct Setting {
    env: String,
    flag: String,
    default: Option<String>,
    help: String,
}

/// The settings of a binary (and of the subcommands named), from its `--help`, run with an
/// empty environment so no value of this machine shows.
fn settings(binary: &str, args: &[&[&str]]) -> BTreeMap<String, Setting> {
    let path = tests::process::binary(binary);
    let mut all = BTreeMap::new();
    for args in args {
        let out = Command::new(&path)
            .args(*args)
            .arg("--help")
            .env_clear()
            .output()
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let text = succeeded(&format!("{binary} --help"), &out);
        for s in parse_help(&text) {
            all.insert(s.env.clone(), s);
        }
    }
    all
}

/// clap's long help: an option's first line names its flag (`      --listen <LISTEN>`), the
/// lines below it (indented deeper) its help, `[env: NAME=]` and `[default: …]`.
fn parse_help(text: &str) -> Vec<Setting> {
    let mut blocks: Vec<Vec<&str>> = Vec::new();
    for line in text.lines() {
        let indent = line.len() - line.trim_start().len();
        if (1..=6).contains(&indent) && line.trim_start().starts_with('-') {
            blocks.push(vec![line]);
        } else if indent == 0 && !line.is_empty() {
            blocks.push(Vec::new());
        } else if let Some(b) = blocks.last_mut().filter(|b| !b.is_empty()) {
            b.push(line);
        }
    }
    blocks
        .iter()
        .filter(|b| !b.is_empty())
        .filter_map(|b| {
            let text = b.join("\n");
            let env = text.split("[env: ").nth(1)?;
            let env = env[..env.find(['=', ']'])?].to_owned();
            let flag = b[0]
                .split_whitespace()
                .find(|w| w.starts_with("--"))?
                .trim_end_matches(',')
                .to_owned();
            let default = text
                .split("[default: ")
                .nth(1)
                .and_then(|d| d.split(']').next())
                .map(str::to_owned);
            Some(Setting {
                env,
                flag,
                default,
                help: text,
            })
        })
        .collect()
}

fn api_help() -> BTreeMap<String, Setting> {
    let api = settings("api", &[&[]]);
    assert!(api.len() > 20, "api --help lists its [env: …]: {api:?}");
    api
}

fn worker_help() -> BTreeMap<String, Setting> {
    let worker = settings("worker", &[&[]]);
    assert!(
        worker.len() > 20,
        "worker --help lists its [env: …]: {worker:?}"
    );
    worker
}

/// Parses `vars` as the binary would read them from its environment, with its own clap
/// parser, by the flag each variable belongs to (the environment is shared by every test
/// thread: no test may set it).
fn parse_as<C: Parser>(
    binary: &str,
    help: &BTreeMap<String, Setting>,
    vars: &BTreeMap<String, String>,
) -> Result<C, clap::Error> {
    let mut args = vec![binary.to_owned()];
    for (k, v) in vars {
        let s = help
            .get(k)
            .unwrap_or_else(|| panic!("{binary} reads no {k}"));
        args.push(format!("{}={v}", s.flag));
    }
    C::try_parse_from(args)
}

/// What a container runs, found from its image and command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Api,
    Worker,
    Migrate,
}

fn role(container: &Value) -> Role {
    let image = container["image"].as_str().expect("image");
    let command = container["command"][0].as_str();
    // `registry:5000/gateway-api:1.2@sha256:…` → `gateway-api`
    let name = image
        .rsplit('/')
        .next()
        .and_then(|n| n.split([':', '@']).next());
    match (name, command) {
        (Some("gateway-worker"), None) => Role::Worker,
        (Some("gateway-api"), None) => Role::Api,
        (Some("gateway-api"), Some("gatewayctl")) => Role::Migrate,
        _ => panic!("a container of unknown role: {image} {command:?}"),
    }
}

/// Settings each role must be given beyond those whose default names the local cluster,
/// and why.
const REQUIRED: &[(Role, &str, &str)] = &[
    (
        Role::Api,
        "WEBHOOK_SECRET_KEYS",
        "webhooks are off without it",
    ),
    (
        Role::Api,
        "AUTH_JWKS_URL",
        "login JWTs are refused without it",
    ),
    (
        Role::Worker,
        "WORKER_METRICS_LISTEN",
        "the probes and scrapes need it",
    ),
    (
        Role::Worker,
        "CREDENTIALS_KEYS",
        "the WhatsApp driver seals device keys with it",
    ),
];

/// A default that only suits a local cluster: a loopback address, the local gateway, the
/// development issuer.
fn is_local_default(default: &str) -> bool {
    ["127.0.0.1", "localhost", "gw-local", "gateway-dev"]
        .iter()
        .any(|m| default.contains(m))
}

/// What is wrong with the variables of every container in `docs`: a variable its binary
/// does not read, a required one missing, a local-only one set, or a value its parser
/// refuses.
fn env_problems(docs: &[Value]) -> Vec<String> {
    let api = api_help();
    let worker = worker_help();
    // gatewayctl reads the api's settings (it parses `api::Config`), and its own.
    let mut ctl = api.clone();
    ctl.extend(settings("gatewayctl", &[&[], &["migrate"]]));
    let mut problems = Vec::new();
    for doc in docs {
        let Some(pod) = [
            "/spec/template/spec",
            "/spec/jobTemplate/spec/template/spec",
        ]
        .iter()
        .find_map(|p| doc.pointer(p)) else {
            continue;
        };
        let owner = format!(
            "{}/{}",
            doc["kind"].as_str().unwrap_or_default(),
            doc["metadata"]["name"].as_str().unwrap_or_default()
        );
        for c in pod["containers"].as_array().into_iter().flatten() {
            let role = role(c);
            let reads = match role {
                Role::Api => &api,
                Role::Worker => &worker,
                Role::Migrate => &ctl,
            };
            let mut set = BTreeSet::new();
            for e in c["env"].as_array().into_iter().flatten() {
                set.insert(e["name"].as_str().expect("name").to_owned());
            }
            for from in c["envFrom"].as_array().into_iter().flatten() {
                let (kind, name) = match (
                    from["configMapRef"]["name"].as_str(),
                    from["secretRef"]["name"].as_str(),
                ) {
                    (Some(n), _) => ("ConfigMap", n),
                    (_, Some(n)) => ("Secret", n),
                    _ => continue,
                };
                let Some(source) = docs
                    .iter()
                    .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
                else {
                    problems.push(format!(
                        "{owner}: envFrom {kind} {name} is not in the overlay"
                    ));
                    continue;
                };
                set.extend(
                    source["data"]
                        .as_object()
                        .into_iter()
                        .flatten()
                        .map(|(k, _)| k.clone()),
                );
            }
            for name in &set {
                match reads.get(name) {
                    None => problems.push(format!("{owner}: {role:?} reads no {name}")),
                    Some(s)
                        if s.help.to_lowercase().contains("development only")
                            || s.help.to_lowercase().contains("tests only") =>
                    {
                        problems.push(format!("{owner}: {name} is for local use only"))
                    }
                    Some(_) => {}
                }
            }
            let required: BTreeSet<&str> = match role {
                // `migrate` connects to the database and nothing else.
                Role::Migrate => BTreeSet::from(["DATABASE_URL"]),
                _ => reads
                    .values()
                    .filter(|s| s.default.as_deref().is_some_and(is_local_default))
                    .map(|s| s.env.as_str())
                    .chain(REQUIRED.iter().filter(|r| r.0 == role).map(|r| r.1))
                    .collect(),
            };
            for name in required {
                if !set.contains(name) {
                    problems.push(format!("{owner}: {role:?} needs {name} set"));
                }
            }
            // The values, as the binary's own parser reads them.
            if set.iter().all(|n| reads.contains_key(n)) {
                let vars = literal_env(docs, c, "gw-test-1");
                let parsed = match role {
                    Role::Worker => parse_as::<worker::Config>("worker", &worker, &vars).err(),
                    Role::Api => parse_as::<api::Config>("api", &api, &vars).err(),
                    // gatewayctl parses the api's settings; `migrate`'s own (the api role)
                    // are its subcommand's.
                    Role::Migrate => {
                        let vars = vars
                            .into_iter()
                            .filter(|(k, _)| api.contains_key(k))
                            .collect();
                        parse_as::<api::Config>("api", &api, &vars).err()
                    }
                };
                if let Some(e) = parsed {
                    problems.push(format!("{owner}: {role:?} refuses its settings: {e}"));
                }
            }
        }
    }
    problems
}

#[test]
fn every_variable_the_manifests_set_is_read_by_its_binary_and_every_required_one_is_set() {
    let api = api_help();
    for name in [
        "DATABASE_URL",
        "AMQP_URL",
        "API_LISTEN",
        "WEBHOOK_SECRET_KEYS",
    ] {
        assert!(api.contains_key(name), "api --help lists {name}: {api:?}");
    }
    assert_eq!(api["API_LISTEN"].flag, "--listen");
    assert!(worker_help().contains_key("GATEWAY_ID"));

    for region in REGIONS {
        let docs = documents(&render(region));
        let problems = env_problems(&docs);
        assert!(problems.is_empty(), "{region}:\n{}", problems.join("\n"));
    }

    // The check finds each kind of mistake.
    let yaml = render("sg");
    let broken = |from: &str, to: &str| {
        assert!(yaml.contains(from), "{from}");
        env_problems(&documents(&yaml.replacen(from, to, 1))).join("\n")
    };
    let p = broken("GATEWAY_REGION: sg", "GATEWAY_REGIONS: sg");
    assert!(p.contains("Worker reads no GATEWAY_REGIONS"), "{p}");
    let p = broken(
        "WORKER_METRICS_LISTEN: 0.0.0.0:9090",
        "WORKER_METRICS_LISTEN: metrics-port",
    );
    assert!(p.contains("refuses its settings"), "{p}");
    let p = broken("API_LISTEN: 0.0.0.0:8080", "DEV_JWT_KEY_FILE: /dev/key.pem");
    assert!(p.contains("Api needs API_LISTEN set"), "{p}");
    assert!(p.contains("DEV_JWT_KEY_FILE is for local use only"), "{p}");
    let p = broken("- name: GATEWAY_ID", "- name: GATEWAY_IDENTITY");
    assert!(p.contains("Worker needs GATEWAY_ID set"), "{p}");
}

/// Metric names the code emits (`metrics::counter!("name"…`), read from the sources of the
/// api, the worker and the shared crate; a histogram also as its `_bucket`, `_sum`, `_count`.
fn emitted_metrics() -> BTreeSet<String> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).expect("read_dir").flatten() {
            let path = entry.path();
            if path.is_dir() {
                walk(&path, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push(path);
            }
        }
    }
    let mut files = Vec::new();
    for krate in ["api", "worker", "shared"] {
        walk(&repo().join(krate).join("src"), &mut files);
    }
    let mut names = BTreeSet::new();
    for file in files {
        let text = std::fs::read_to_string(&file).expect("source");
        for kind in ["counter", "gauge", "histogram"] {
            for (at, _) in text.match_indices(&format!("{kind}!(")) {
                let rest = text[at + kind.len() + 2..].trim_start();
                let Some(name) = rest.strip_prefix('"').and_then(|r| r.split('"').next()) else {
                    continue;
                };
                names.insert(name.to_owned());
                if kind == "histogram" {
                    for suffix in ["_bucket", "_sum", "_count"] {
                        names.insert(format!("{name}{suffix}"));
                    }
                }
            }
        }
    }
    assert!(names.len() > 20, "metrics found in the sources: {names:?}");
    names
}

/// The metric names a PromQL expression reads: identifiers that are not functions,
/// keywords or aggregations, label names (inside `{…}` or `by (…)`), strings, durations or
/// numbers. (Prometheus' own parser checks the syntax: `promtool_parses`.)
fn metric_names(expr: &str) -> BTreeSet<String> {
    const KEYWORDS: [&str; 25] = [
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
        "bool",
        "and",
        "or",
        "unless",
        "offset",
        "sum",
        "min",
        "max",
        "avg",
        "count",
        "stddev",
        "stdvar",
        "topk",
        "bottomk",
        "quantile",
        "count_values",
        "group",
        "limitk",
        "limit_ratio",
    ];
    let chars: Vec<char> = expr.chars().collect();
    let mut names = BTreeSet::new();
    let mut i = 0;
    // After `by`, `on`, … the parenthesis holds label names.
    let mut labels_next = false;
    while i < chars.len() {
        let c = chars[i];
        if c == '"' || c == '\'' || c == '`' {
            i += 1;
            while i < chars.len() && chars[i] != c {
                i += if chars[i] == '\\' { 2 } else { 1 };
            }
            i += 1;
        } else if c == '{' || c == '[' || (c == '(' && labels_next) {
            let close = match c {
                '{' => '}',
                '[' => ']',
                _ => ')',
            };
            while i < chars.len() && chars[i] != close {
                if chars[i] == '"' {
                    i += 1;
                    while i < chars.len() && chars[i] != '"' {
                        i += 1;
                    }
                }
                i += 1;
            }
            i += 1;
            labels_next = false;
        } else if c.is_ascii_digit()
            || (c == '.' && chars.get(i + 1).is_some_and(char::is_ascii_digit))
        {
            while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '.') {
                i += 1;
            }
        } else if c.is_ascii_alphabetic() || c == '_' || c == ':' {
            let start = i;
            while i < chars.len()
                && (chars[i].is_ascii_alphanumeric() || chars[i] == '_' || chars[i] == ':')
            {
                i += 1;
            }
            let word: String = chars[start..i].iter().collect();
            let next = chars[i..].iter().find(|c| !c.is_whitespace());
            if KEYWORDS.contains(&word.as_str()) {
                labels_next = matches!(
                    word.as_str(),
                    "by" | "without" | "on" | "ignoring" | "group_left" | "group_right"
                );
            } else if next != Some(&'(') {
                names.insert(word);
            }
        } else {
            i += 1;
        }
    }
    names
}

/// The series the alert rules record (`record:`), which dashboards may read too.
fn rules() -> Value {
    let path = repo().join("deploy/prometheus/rules/gateway.rules.yml");
    let text = std::fs::read_to_string(&path).expect("rules");
    serde_norway::from_str(&text).expect("rules parse")
}

fn rule_exprs(rules: &Value) -> Vec<(String, String)> {
    rules["groups"]
        .as_array()
        .expect("groups")
        .iter()
        .flat_map(|g| g["rules"].as_array().expect("rules").iter())
        .map(|r| {
            let name = r["alert"].as_str().or(r["record"].as_str()).expect("name");
            (
                name.to_owned(),
                r["expr"].as_str().expect("expr").to_owned(),
            )
        })
        .collect()
}

/// Names in `exprs` that neither the code emits nor the rules record, but for other
/// exporters' metrics the dashboard reads on purpose (RabbitMQ's own plugin).
fn unknown_metrics(exprs: &[(String, String)]) -> Vec<String> {
    let mut known = emitted_metrics();
    for rule in rules()["groups"].as_array().expect("groups") {
        for r in rule["rules"].as_array().expect("rules") {
            if let Some(name) = r["record"].as_str() {
                known.insert(name.to_owned());
            }
        }
    }
    exprs
        .iter()
        .flat_map(|(what, e)| metric_names(e).into_iter().map(move |m| (what.clone(), m)))
        // `up` is Prometheus' own, one per scrape target.
        .filter(|(_, m)| !known.contains(m) && !m.starts_with("rabbitmq_") && m != "up")
        .map(|(what, m)| format!("{what}: {m}"))
        .collect()
}

#[test]
fn promql_metric_names_are_read_as_prometheus_does() {
    let names = |e: &str| metric_names(e).into_iter().collect::<Vec<_>>();
    assert_eq!(
        names(
            r#"histogram_quantile(0.95, sum by (le, kind) (rate(worker_command_duration_seconds_bucket{kind=~"a|b"}[5m])))"#
        ),
        ["worker_command_duration_seconds_bucket"]
    );
    assert_eq!(
        names("max by (gateway, region) (x) * on (gateway) group_left (region) y ^ 0 > bool 1e3"),
        ["x", "y"]
    );
    assert_eq!(names(r#"a:b:c{s="by (x)"} offset 5m or z"#), ["a:b:c", "z"]);
    let unknown = unknown_metrics(&[(
        "panel".into(),
        "sum(rate(api_commandz_total[5m])) / sum(rate(api_commands_total[5m]))".into(),
    )]);
    assert_eq!(unknown, ["panel: api_commandz_total"]);
}

/// `promtool check rules` on a rules file of `exprs` as recording rules: Prometheus' own
/// parser reads each expression.
fn promtool_parses(exprs: &[(String, String)]) {
    let rules: Vec<Value> = exprs
        .iter()
        .enumerate()
        .map(
            |(i, (_, e))| serde_json::json!({ "record": format!("dashboard:expr:{i}"), "expr": e }),
        )
        .collect();
    let file = std::env::temp_dir().join(format!("gw-dashboard-{}.rules.json", tests::unique()));
    std::fs::write(
        &file,
        serde_json::json!({ "groups": [{ "name": "dashboard", "rules": rules }] }).to_string(),
    )
    .expect("write");
    let out = run(
        "promtool",
        &["check", "rules", file.to_str().expect("path")],
        None,
    );
    let _ = std::fs::remove_file(&file);
    succeeded("promtool check rules of the dashboard's queries", &out);
}

#[test]
fn the_alert_rules_pass_promtool_and_their_unit_tests_and_read_only_emitted_metrics() {
    let dir = repo().join("deploy/prometheus/rules");
    let rules_file = dir.join("gateway.rules.yml");
    succeeded(
        "promtool check rules",
        &run(
            "promtool",
            &["check", "rules", rules_file.to_str().expect("path")],
            None,
        ),
    );
    let tests_file = dir.join("gateway.rules.test.yml");
    succeeded(
        "promtool test rules",
        &run(
            "promtool",
            &["test", "rules", tests_file.to_str().expect("path")],
            None,
        ),
    );
    let exprs = rule_exprs(&rules());
    for alert in [
        "GatewayHeartbeatMissing",
        "GatewayCommandsTimingOut",
        "GatewayDeadLettersRising",
        "GatewayRegionNoSpareCapacity",
        "GatewayApiDown",
        "GatewayWorkersUnscraped",
        "GatewayBrokerDown",
        "GatewayScrapeTargetDown",
    ] {
        assert!(exprs.iter().any(|(n, _)| n == alert), "no alert {alert}");
    }
    let unknown = unknown_metrics(&exprs);
    assert!(
        unknown.is_empty(),
        "rules read metrics nobody emits: {unknown:?}"
    );

    // promtool fails a rule file it cannot parse, and a unit test whose alert does not come.
    let broken = std::env::temp_dir().join(format!("gw-rules-{}", tests::unique()));
    std::fs::create_dir_all(&broken).expect("dir");
    let text = std::fs::read_to_string(&rules_file).expect("rules");
    std::fs::write(
        broken.join("gateway.rules.yml"),
        text.replacen(
            "fleet_gateway_heartbeat_age_seconds) > 60",
            "fleet_gateway_heartbeat_age_seconds) > 6000",
            1,
        ),
    )
    .expect("write");
    std::fs::copy(&tests_file, broken.join("gateway.rules.test.yml")).expect("copy");
    let out = run(
        "promtool",
        &[
            "test",
            "rules",
            broken
                .join("gateway.rules.test.yml")
                .to_str()
                .expect("path"),
        ],
        None,
    );
    let _ = std::fs::remove_dir_all(&broken);
    assert!(
        !out.status.success(),
        "promtool passed a heartbeat alert that never fires"
    );
}

#[test]
fn the_dashboard_parses_and_every_query_reads_a_metric_the_code_emits() {
    let path = repo().join("deploy/grafana/dashboards/fleet.json");
    let dashboard: Value =
        serde_json::from_str(&std::fs::read_to_string(&path).expect("dashboard")).expect("JSON");
    let vars = dashboard["templating"]["list"]
        .as_array()
        .expect("variables");
    assert!(
        vars.iter().any(|v| v["type"] == "datasource"
            && v["query"] == "prometheus"
            && v["name"] == "datasource"),
        "Prometheus is a datasource variable"
    );

    let mut exprs = Vec::new();
    for v in vars.iter().filter(|v| v["type"] == "query") {
        let q = v["query"]["query"].as_str().expect("variable query");
        // `label_values(metric{…}, label)`: the metric is what it reads.
        let inner = q
            .strip_prefix("label_values(")
            .and_then(|r| r.rsplit_once(','))
            .map(|(m, _)| m)
            .unwrap_or(q);
        let name = v["name"].as_str().unwrap_or_default();
        exprs.push((format!("variable {name}"), inner.to_owned()));
    }
    let panels = dashboard["panels"].as_array().expect("panels");
    for p in panels.iter().filter(|p| p["type"] != "row") {
        assert_eq!(p["datasource"]["uid"], "${datasource}", "{}", p["title"]);
        for t in p["targets"].as_array().expect("targets") {
            exprs.push((
                format!("panel {}", p["title"]),
                t["expr"].as_str().expect("expr").to_owned(),
            ));
        }
    }
    assert!(exprs.len() > 20, "{} queries", exprs.len());
    let unknown = unknown_metrics(&exprs);
    assert!(
        unknown.is_empty(),
        "the dashboard reads metrics nobody emits: {unknown:?}"
    );

    // Each query parses as PromQL, with Grafana's variables as Grafana would fill them.
    let filled: Vec<(String, String)> = exprs
        .iter()
        .map(|(w, e)| {
            let e = e
                .replace("$__rate_interval", "5m")
                .replace("$region", ".*")
                .replace("$gateway", ".*");
            (w.clone(), e)
        })
        .collect();
    promtool_parses(&filled);

    // What the fleet's SREs look for first is there.
    let all: String = exprs.iter().map(|(_, e)| e.as_str()).collect();
    for needed in [
        "api_commands_total",
        "histogram_quantile",
        "worker_sessions",
        "worker_message_queue_depth",
        "amqp_reconnects_total",
        "api_dead_letters_total",
    ] {
        assert!(all.contains(needed), "no panel reads {needed}");
    }
}

/// Every alert links its runbook: a section of deploy/prometheus/RUNBOOK.md that exists.
#[test]
fn every_alert_links_a_runbook_section_that_exists() {
    let runbook =
        std::fs::read_to_string(repo().join("deploy/prometheus/RUNBOOK.md")).expect("the runbook");
    // Anchors as Markdown renderers make them from `## Heading`.
    let anchors: Vec<String> = runbook
        .lines()
        .filter_map(|l| l.strip_prefix("## "))
        .map(|h| h.trim().to_lowercase().replace(' ', "-"))
        .collect();
    let rules = rules();
    let alerts: Vec<&Value> = rules["groups"]
        .as_array()
        .expect("groups")
        .iter()
        .flat_map(|g| g["rules"].as_array().expect("rules").iter())
        .filter(|r| r.get("alert").is_some())
        .collect();
    assert!(alerts.len() >= 5, "{alerts:?}");
    for alert in alerts {
        let name = alert["alert"].as_str().expect("alert");
        let url = alert["annotations"]["runbook_url"]
            .as_str()
            .unwrap_or_else(|| panic!("{name} has no runbook_url"));
        let anchor = url
            .split_once("deploy/prometheus/RUNBOOK.md#")
            .map(|(_, a)| a)
            .unwrap_or_else(|| panic!("{name}: {url} is not a section of the runbook"));
        assert!(
            anchors.iter().any(|a| a == anchor),
            "{name}: no section #{anchor} in the runbook ({anchors:?})"
        );
    }
}

/// The Prometheus Operator's resources (deploy/k8s/monitoring): a PodMonitor per tier that
/// finds the rendered pods, on a port they have, with the job names the rules use, and a
/// PrometheusRule carrying exactly the rules promtool tests.
#[test]
fn the_operators_monitors_scrape_both_tiers_and_carry_the_tested_rules() {
    let dir = repo().join("deploy/k8s/monitoring");
    let docs = documents(&succeeded(
        "kubectl kustomize deploy/k8s/monitoring",
        &run("kubectl", &["kustomize", dir.to_str().expect("path")], None),
    ));
    let rule = find(&docs, "PrometheusRule", "gateway-fleet");
    assert_eq!(
        rule["spec"],
        rules(),
        "prometheusrule.yaml is stale: run deploy/k8s/monitoring/prometheusrule.sh"
    );
    let region = documents(&render("sg"));
    for (monitor, workload, kind, job) in [
        ("gateway-api", "gateway-api", "Deployment", "api"),
        ("gateway-worker", "gw-sg", "StatefulSet", "worker"),
    ] {
        let monitor = find(&docs, "PodMonitor", monitor);
        let template = &find(&region, kind, workload)["spec"]["template"];
        let labels = template["metadata"]["labels"]
            .as_object()
            .expect("pod labels");
        for (k, v) in monitor["spec"]["selector"]["matchLabels"]
            .as_object()
            .expect("selector")
        {
            assert_eq!(labels.get(k), Some(v), "{workload}'s pods match on {k}");
        }
        let job_label = monitor["spec"]["jobLabel"].as_str().expect("jobLabel");
        assert_eq!(labels[job_label], job, "the rules' job name");
        let port = monitor["spec"]["podMetricsEndpoints"][0]["port"]
            .as_str()
            .expect("port");
        let ports = template["spec"]["containers"][0]["ports"]
            .as_array()
            .expect("ports");
        assert!(
            ports.iter().any(|p| p["name"] == port),
            "{workload} has a port {port}"
        );
    }
}
