//! The Helm chart `deploy/helm/llmsched`, checked with the real tools a user and a cluster
//! would apply to it: the real `helm` (v4, `lint --strict`, `template`), PyPI's
//! `kubernetes-validate --strict` against Kubernetes 1.33's schemas, the custom resources
//! against the CRDs generated from our Rust types (jsonschema), the EPP container's arguments
//! through `llmsched epp`'s own parser and configuration loader, and the standalone Envoy
//! bootstrap written by the init container's exact command with the built binary and accepted
//! by a real Envoy (`--mode validate`).
//!
//! Every values file in `deploy/helm/llmsched/ci/` is rendered; every file in
//! `deploy/tests/bad-values/` must be refused with the error its `# expect:` line names.
//! No cluster is involved: nothing here needs an API server (see crates/kubetest for the
//! protocol-level tests of discovery).

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may unwrap (team rule: no unwrap outside tests)

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use clap::Parser;
use serde::Deserialize;
use serde_json::{Value, json};
use support::{Tool, both, repo_root, run, tool};

const RELEASE: &str = "gaie-inference-scheduling";
const NAMESPACE: &str = "llm-d";
/// The Kubernetes version the manifests are validated against.
const KUBERNETES_VERSION: &str = "1.33.0";

fn chart() -> PathBuf {
    repo_root().join("deploy/helm/llmsched")
}

/// The values files every check runs on: the chart's defaults (`None`) and `ci/*.yaml`.
fn values_files() -> Vec<Option<PathBuf>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(chart().join("ci"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    let names: BTreeSet<String> = files
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    for required in [
        "standalone-values.yaml",
        "proxy-values.yaml",
        "ha-values.yaml",
        "metrics-auth-off-values.yaml",
        "servicemonitor-values.yaml",
        "endpoint-selector-values.yaml",
    ] {
        assert!(names.contains(required), "ci/{required} is missing");
    }
    std::iter::once(None)
        .chain(files.into_iter().map(Some))
        .collect()
}

fn label(values: Option<&Path>) -> String {
    values.map_or_else(
        || "default values".to_string(),
        |p| p.file_name().unwrap().to_string_lossy().into_owned(),
    )
}

fn helm() -> Command {
    let mut c = Command::new(tool(Tool::Helm));
    // No user configuration, cache or plugins leak into the test.
    let home = std::env::temp_dir().join("llmsched-helm-test-home");
    c.env("HELM_CONFIG_HOME", home.join("config"))
        .env("HELM_CACHE_HOME", home.join("cache"))
        .env("HELM_DATA_HOME", home.join("data"));
    c
}

fn helm_template(values: Option<&Path>) -> Result<String, String> {
    let mut c = helm();
    c.args(["template", RELEASE])
        .arg(chart())
        .args(["--namespace", NAMESPACE, "--include-crds"]);
    if let Some(v) = values {
        c.arg("--values").arg(v);
    }
    let out = run(&mut c);
    if out.status.success() {
        Ok(String::from_utf8(out.stdout).unwrap())
    } else {
        Err(both(&out))
    }
}

/// YAML documents as JSON values (empty documents dropped).
fn yaml_docs(text: &str) -> Vec<Value> {
    serde_norway::Deserializer::from_str(text)
        .map(|d| Value::deserialize(d).unwrap())
        .filter(|v| !v.is_null())
        .collect()
}

/// One rendering of the chart.
struct Render {
    label: String,
    values: Value,
    text: String,
    docs: Vec<Value>,
}

impl Render {
    fn new(values: Option<&Path>) -> Render {
        let label = label(values);
        let text = helm_template(values).unwrap_or_else(|e| panic!("{label}: {e}"));
        let defaults: Value =
            serde_norway::from_str(&std::fs::read_to_string(chart().join("values.yaml")).unwrap())
                .unwrap();
        let mut merged = defaults;
        if let Some(v) = values {
            let user: Value = serde_norway::from_str(&std::fs::read_to_string(v).unwrap()).unwrap();
            merge(&mut merged, user);
        }
        let docs = yaml_docs(&text);
        Render {
            label,
            values: merged,
            text,
            docs,
        }
    }

    fn all(&self, kind: &str) -> Vec<&Value> {
        self.docs.iter().filter(|d| d["kind"] == kind).collect()
    }

    fn one(&self, kind: &str) -> &Value {
        let all = self.all(kind);
        assert_eq!(all.len(), 1, "{}: expected one {kind}", self.label);
        all[0]
    }

    fn named(&self, kind: &str, name: &str) -> Option<&Value> {
        self.docs
            .iter()
            .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
    }

    fn pod(&self) -> &Value {
        &self.one("Deployment")["spec"]["template"]["spec"]
    }

    fn container(&self, name: &str) -> Option<&Value> {
        self.pod()["containers"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == name)
    }

    fn mode(&self) -> &str {
        self.values["mode"].as_str().unwrap()
    }

    fn replicas(&self) -> i64 {
        self.values["replicas"].as_i64().unwrap()
    }

    fn pool_mode(&self) -> bool {
        self.values["discovery"]["mode"] == "pool"
    }

    fn pool_namespace(&self) -> String {
        match self.values["discovery"]["pool"]["namespace"].as_str() {
            Some(ns) if !ns.is_empty() && self.pool_mode() => ns.to_string(),
            _ => NAMESPACE.to_string(),
        }
    }

    fn metrics_auth(&self) -> bool {
        self.values["metrics"]["auth"]["enabled"] == true
    }

    fn fullname(&self) -> String {
        format!("{RELEASE}-llmsched")
    }

    fn epp_args(&self) -> Vec<String> {
        self.container("epp").unwrap()["args"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a.as_str().unwrap().to_string())
            .collect()
    }
}

/// Helm's merge of a values file over the defaults: maps merge, everything else replaces.
fn merge(base: &mut Value, over: Value) {
    match (base, over) {
        (Value::Object(b), Value::Object(o)) => {
            for (k, v) in o {
                match b.get_mut(&k) {
                    Some(slot) => merge(slot, v),
                    None => {
                        b.insert(k, v);
                    }
                }
            }
        }
        (slot, v) => *slot = v,
    }
}

fn renders() -> Vec<Render> {
    values_files()
        .iter()
        .map(|v| Render::new(v.as_deref()))
        .collect()
}

/// Kinds whose schemas Kubernetes itself defines (the rest are custom resources).
fn is_builtin(doc: &Value) -> bool {
    let api = doc["apiVersion"].as_str().unwrap();
    let group = api.rsplit_once('/').map_or("", |(g, _)| g);
    group.is_empty()
        || group.ends_with(".k8s.io") && !group.starts_with("inference.")
        || group == "apps"
}

fn write_docs(dir: &Path, name: &str, docs: &[&Value]) -> PathBuf {
    let text: String = docs
        .iter()
        .map(|d| format!("---\n{}", serde_norway::to_string(d).unwrap()))
        .collect();
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

fn kubernetes_validate(file: &Path) -> std::process::Output {
    run(Command::new(tool(Tool::KubernetesValidate))
        .args(["--strict", "--kubernetes-version", KUBERNETES_VERSION])
        .arg(file))
}

#[test]
fn chart_lints_strictly_with_every_values_file() {
    for values in values_files() {
        let mut c = helm();
        c.args(["lint", "--strict"]).arg(chart());
        if let Some(v) = &values {
            c.arg("--values").arg(v);
        }
        let out = run(&mut c);
        let text = both(&out);
        assert!(out.status.success(), "{}: {text}", label(values.as_deref()));
        assert!(text.contains("0 chart(s) failed"), "{text}");
    }
}

#[test]
fn rendered_objects_are_valid_kubernetes_1_33_objects() {
    let dir = tempfile::tempdir().unwrap();
    for r in renders() {
        let builtin: Vec<&Value> = r.docs.iter().filter(|d| is_builtin(d)).collect();
        assert!(
            builtin.len() >= 6,
            "{}: only {} objects",
            r.label,
            builtin.len()
        );
        let file = write_docs(dir.path(), "builtin.yaml", &builtin);
        let out = kubernetes_validate(&file);
        let text = both(&out);
        assert!(
            out.status.success(),
            "{}: kubernetes-validate: {text}",
            r.label
        );
        let passed = text.matches(" passed for resource ").count();
        assert_eq!(
            passed,
            builtin.len(),
            "{}: every object must be validated: {text}",
            r.label
        );
        assert!(
            !text.contains("Couldn't find schema"),
            "{}: {text}",
            r.label
        );
    }

    // The validator is strict: an unknown field in the pod spec, a wrong type, fail.
    let r = Render::new(None);
    for mutate in [
        (|d: &mut Value| d["spec"]["template"]["spec"]["containers"][0]["bogus"] = json!(1))
            as fn(&mut Value),
        |d: &mut Value| d["spec"]["replicas"] = json!("one"),
    ] {
        let mut d = r.one("Deployment").clone();
        mutate(&mut d);
        let file = write_docs(dir.path(), "bad.yaml", &[&d]);
        let out = kubernetes_validate(&file);
        assert!(
            !out.status.success(),
            "kubernetes-validate accepted a broken Deployment: {}",
            both(&out)
        );
    }
}

/// The CRDs the chart ships (`crds/`), parsed.
fn chart_crds() -> Vec<Value> {
    let dir = chart().join("crds");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    files
        .iter()
        .flat_map(|f| yaml_docs(&std::fs::read_to_string(f).unwrap()))
        .collect()
}

fn validate_custom_resources(file: &Path) -> std::process::Output {
    run(Command::new(tool(Tool::ValidatePython))
        .arg(repo_root().join("deploy/tests/validate_custom_resources.py"))
        .arg("--crds")
        .arg(chart().join("crds"))
        .arg(file))
}

#[test]
fn custom_resources_match_the_crds() {
    let crd_groups: BTreeSet<String> = chart_crds()
        .iter()
        .map(|c| c["spec"]["group"].as_str().unwrap().to_string())
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let mut checked = 0;
    for r in renders() {
        let custom: Vec<&Value> = r
            .docs
            .iter()
            .filter(|d| {
                let api = d["apiVersion"].as_str().unwrap();
                crd_groups.contains(api.rsplit_once('/').map_or("", |(g, _)| g))
            })
            .collect();
        // `helm template --include-crds` renders the CRDs themselves too: they are built-in
        // objects, checked by kubernetes-validate above.
        assert_eq!(
            r.all("CustomResourceDefinition").len(),
            chart_crds().len(),
            "{}",
            r.label
        );
        let expect_pool = r.values["inferencePool"]["create"] == true && r.pool_mode();
        assert_eq!(
            r.all("InferencePool").len(),
            usize::from(expect_pool),
            "{}",
            r.label
        );
        if custom.is_empty() {
            continue;
        }
        let file = write_docs(dir.path(), "custom.yaml", &custom);
        let out = validate_custom_resources(&file);
        let text = both(&out);
        assert!(out.status.success(), "{}: {text}", r.label);
        assert_eq!(
            text.lines().filter(|l| l.starts_with("ok ")).count(),
            custom.len(),
            "{}: {text}",
            r.label
        );
        checked += custom.len();
    }
    assert!(
        checked >= 3,
        "only {checked} custom resources were rendered"
    );

    // The validator rejects what the API server would.
    let r = Render::new(Some(&chart().join("ci/standalone-values.yaml")));
    let pool = r.one("InferencePool");
    for (what, mutate) in [
        (
            "port out of range",
            (|p: &mut Value| p["spec"]["targetPorts"][0]["number"] = json!(70000))
                as fn(&mut Value),
        ),
        ("unknown field", |p: &mut Value| {
            p["spec"]["targetPortz"] = json!([{"number": 8000}])
        }),
        ("no selector", |p: &mut Value| {
            p["spec"].as_object_mut().unwrap().remove("selector");
        }),
        ("unserved version", |p: &mut Value| {
            p["apiVersion"] = json!("inference.networking.k8s.io/v9")
        }),
    ] {
        let mut p = pool.clone();
        mutate(&mut p);
        let file = write_docs(dir.path(), "bad.yaml", &[&p]);
        let out = validate_custom_resources(&file);
        assert!(
            !out.status.success() && both(&out).contains("FAIL"),
            "{what}: accepted: {}",
            both(&out)
        );
    }
}

const CRD_FILE: &str = "deploy/helm/llmsched/crds/llmsched-crds.yaml";

#[test]
fn crds_are_the_ones_the_rust_types_generate() {
    let out = run(Command::new(env!("CARGO_BIN_EXE_llmsched")).arg("crds"));
    assert!(out.status.success(), "llmsched crds: {}", both(&out));
    let generated = String::from_utf8(out.stdout).unwrap();
    let names: Vec<String> = yaml_docs(&generated)
        .iter()
        .map(|c| c["metadata"]["name"].as_str().unwrap().to_string())
        .collect();
    for name in [
        "inferencepools.inference.networking.k8s.io",
        "inferencepools.inference.networking.x-k8s.io",
        "inferenceobjectives.inference.networking.x-k8s.io",
        "inferencemodelrewrites.inference.networking.x-k8s.io",
        "inferenceobjectives.llm-d.ai",
        "inferencemodelrewrites.llm-d.ai",
    ] {
        assert!(
            names.iter().any(|n| n == name),
            "llmsched crds lacks {name}: {names:?}"
        );
    }
    // The committed file is the generator's output under a one-line header, byte for byte.
    let committed = std::fs::read_to_string(repo_root().join(CRD_FILE)).unwrap();
    let (header, body) = committed.split_once('\n').unwrap();
    assert!(
        header.starts_with("# Generated by scripts/generate-crds.sh"),
        "{header}"
    );
    assert!(
        body == generated,
        "{CRD_FILE} differs from `llmsched crds`: run scripts/generate-crds.sh"
    );
    // The chart ships nothing else as CRDs.
    let files: Vec<String> = std::fs::read_dir(chart().join("crds"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(files, ["llmsched-crds.yaml"]);
}

/// The EPP's arguments, parsed by `llmsched epp`'s own parser, mean what the values say, and
/// the configuration file they name loads.
#[test]
fn epp_arguments_start_the_epp() {
    let dir = tempfile::tempdir().unwrap();
    for r in renders() {
        let args = r.epp_args();
        let parsed = llmsched_epp::Args::try_parse_from(
            std::iter::once("epp".to_string()).chain(args.iter().cloned()),
        )
        .unwrap_or_else(|e| panic!("{}: {args:?}: {e}", r.label));
        parsed
            .validate()
            .unwrap_or_else(|e| panic!("{}: {args:?}: {e}", r.label));

        // The inferencepool chart's order: discovery first, then --zap-encoder and
        // --config-file, --tracing=false near the end.
        let first = if r.pool_mode() {
            "--pool-name"
        } else {
            "--endpoint-selector"
        };
        assert_eq!(args[0], first, "{}", r.label);
        let pos = |a: &str| args.iter().position(|x| x == a);
        assert!(pos("--zap-encoder") < pos("--config-file"), "{}", r.label);
        assert!(pos("--tracing=false").is_some(), "{}", r.label);

        if r.pool_mode() {
            let pool = &r.values["discovery"]["pool"];
            let name = pool["name"]
                .as_str()
                .filter(|s| !s.is_empty())
                .unwrap_or(RELEASE);
            assert_eq!(parsed.pool_name.as_deref(), Some(name), "{}", r.label);
            assert_eq!(
                parsed.pool_namespace.as_deref(),
                Some(r.pool_namespace().as_str()),
                "{}",
                r.label
            );
            assert_eq!(parsed.pool_group, pool["group"].as_str().unwrap());
            assert!(parsed.endpoint_selector.is_none());
        } else {
            assert!(parsed.pool_name.is_none());
            assert_eq!(
                parsed.endpoint_selector.as_deref(),
                r.values["discovery"]["endpointSelector"].as_str()
            );
            let ports: Vec<u16> = r.values["discovery"]["endpointTargetPorts"]
                .as_array()
                .unwrap()
                .iter()
                .map(|p| p.as_u64().unwrap() as u16)
                .collect();
            assert_eq!(parsed.endpoint_target_ports, ports, "{}", r.label);
        }
        assert_eq!(
            parsed.ha_enable_leader_election,
            r.replicas() > 1,
            "{}",
            r.label
        );
        assert_eq!(
            parsed.proxy_port,
            (r.mode() == "proxy").then(|| r.values["proxy"]["port"].as_u64().unwrap() as u16),
            "{}",
            r.label
        );
        let ports = &r.values["ports"];
        assert_eq!(u64::from(parsed.grpc_port), ports["grpc"].as_u64().unwrap());
        assert_eq!(
            u64::from(parsed.grpc_health_port),
            ports["health"].as_u64().unwrap()
        );
        assert_eq!(
            u64::from(parsed.metrics_port),
            ports["metrics"].as_u64().unwrap()
        );
        let auth_off = args.iter().any(|a| a == "--metrics-endpoint-auth=false");
        assert_eq!(auth_off, !r.metrics_auth(), "{}", r.label);
        // Every extra flag reaches the EPP as --name=value.
        for (k, v) in r.values["flags"].as_object().unwrap() {
            let v = match v {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            let want = format!("--{k}={v}");
            assert!(args.contains(&want), "{}: {want} not in {args:?}", r.label);
        }

        // The config file is a key of the mounted ConfigMap and loads with the EPP's loader.
        let config_file = parsed.config_file.clone().expect("--config-file");
        let key = config_file
            .strip_prefix("/config")
            .unwrap_or_else(|_| panic!("{}: {config_file:?} is not under /config", r.label))
            .to_string_lossy()
            .into_owned();
        let cm = r
            .named("ConfigMap", &r.fullname())
            .unwrap_or_else(|| panic!("{}: no ConfigMap", r.label));
        let content = cm["data"][&key]
            .as_str()
            .unwrap_or_else(|| panic!("{}: ConfigMap has no {key}", r.label));
        let local = dir.path().join(&key);
        std::fs::write(&local, content).unwrap();
        let mut local_args = parsed.clone();
        local_args.config_file = Some(local);
        llmsched_epp::run::load_config(
            &local_args,
            &llmsched_core::registry::PluginHandle::default(),
        )
        .unwrap_or_else(|e| panic!("{}: {key}: {e}", r.label));

        // The downward API gives the EPP its namespace and pod name, as the reference chart.
        let env = &r.container("epp").unwrap()["env"];
        for (name, field) in [
            ("NAMESPACE", "metadata.namespace"),
            ("POD_NAME", "metadata.name"),
        ] {
            let e = env
                .as_array()
                .unwrap()
                .iter()
                .find(|e| e["name"] == name)
                .unwrap_or_else(|| panic!("{}: no {name}", r.label));
            assert_eq!(e["valueFrom"]["fieldRef"]["fieldPath"], field);
        }
    }
}

/// The pod's shape per mode: containers, ports, probes and grace period as the reference
/// chart has them, and a Service exposing what the mode serves.
#[test]
fn pod_and_service_follow_the_mode() {
    for r in renders() {
        let deployment = r.one("Deployment");
        assert_eq!(deployment["spec"]["strategy"]["type"], "Recreate");
        assert_eq!(deployment["spec"]["replicas"].as_i64(), Some(r.replicas()));
        let pod = r.pod();
        assert_eq!(pod["terminationGracePeriodSeconds"], 130, "{}", r.label);
        assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
        assert_eq!(pod["securityContext"]["runAsUser"], 65532);
        let names: Vec<&str> = pod["containers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["name"].as_str().unwrap())
            .collect();
        let want: &[&str] = if r.mode() == "standalone" {
            &["epp", "envoy"]
        } else {
            &["epp"]
        };
        assert_eq!(names, want, "{}", r.label);

        let epp = r.container("epp").unwrap();
        let election = r.replicas() > 1;
        let health = r.values["ports"]["health"].clone();
        for (probe, service) in [
            (
                "livenessProbe",
                if election {
                    "liveness"
                } else {
                    "inference-extension"
                },
            ),
            (
                "readinessProbe",
                if election {
                    "readiness"
                } else {
                    "inference-extension"
                },
            ),
        ] {
            assert_eq!(epp[probe]["grpc"]["port"], health, "{}", r.label);
            assert_eq!(epp[probe]["grpc"]["service"], service, "{}", r.label);
        }

        let service = r.one("Service");
        let ports: BTreeMap<String, i64> = service["spec"]["ports"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| {
                (
                    p["name"].as_str().unwrap().to_string(),
                    p["port"].as_i64().unwrap(),
                )
            })
            .collect();
        let mut want = BTreeMap::from([
            (
                "grpc-ext-proc".to_string(),
                r.values["ports"]["grpc"].as_i64().unwrap(),
            ),
            (
                "http-metrics".to_string(),
                r.values["ports"]["metrics"].as_i64().unwrap(),
            ),
        ]);
        match r.mode() {
            "standalone" => {
                want.insert("http".into(), r.values["envoy"]["port"].as_i64().unwrap());
            }
            "proxy" => {
                want.insert("http".into(), r.values["proxy"]["port"].as_i64().unwrap());
            }
            _ => {}
        }
        assert_eq!(ports, want, "{}", r.label);
        // Every Service target port names a container port.
        let container_ports: BTreeSet<String> = pod["containers"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|c| c["ports"].as_array().unwrap().iter())
            .map(|p| p["name"].as_str().unwrap().to_string())
            .collect();
        for p in service["spec"]["ports"].as_array().unwrap() {
            let target = p["targetPort"].as_str().unwrap();
            assert!(container_ports.contains(target), "{}: {target}", r.label);
        }
        assert_eq!(
            service["spec"]["selector"],
            deployment["spec"]["selector"]["matchLabels"]
        );
    }
}

fn rules(role: &Value) -> Vec<(Vec<String>, Vec<String>, Vec<String>)> {
    let strings = |v: &Value| -> Vec<String> {
        v.as_array()
            .map(|a| a.iter().map(|s| s.as_str().unwrap().to_string()).collect())
            .unwrap_or_default()
    };
    role["rules"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            let what = if r.get("nonResourceURLs").is_some() {
                strings(&r["nonResourceURLs"])
            } else {
                strings(&r["resources"])
            };
            (strings(&r["apiGroups"]), what, strings(&r["verbs"]))
        })
        .collect()
}

fn s(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

/// RBAC grants exactly what the EPP does with the API server in each configuration.
#[test]
fn rbac_grants_exactly_what_the_epp_needs() {
    for r in renders() {
        let sa = r.one("ServiceAccount");
        let sa_name = sa["metadata"]["name"].as_str().unwrap();
        assert_eq!(r.pod()["serviceAccountName"], sa_name);
        let read = s(&["get", "list", "watch"]);

        let discovery = r.named("Role", &r.fullname()).unwrap();
        assert_eq!(
            discovery["metadata"]["namespace"],
            r.pool_namespace().as_str()
        );
        let mut want = vec![(s(&[""]), s(&["pods"]), read.clone())];
        if r.pool_mode() {
            let group = r.values["discovery"]["pool"]["group"].as_str().unwrap();
            want.push((s(&[group]), s(&["inferencepools"]), read.clone()));
        }
        want.push((
            s(&["inference.networking.x-k8s.io", "llm-d.ai"]),
            s(&["inferenceobjectives", "inferencemodelrewrites"]),
            read.clone(),
        ));
        assert_eq!(rules(discovery), want, "{}", r.label);

        let election = r.named("Role", &format!("{}-leader-election", r.fullname()));
        assert_eq!(election.is_some(), r.replicas() > 1, "{}", r.label);
        if let Some(role) = election {
            assert_eq!(role["metadata"]["namespace"], r.pool_namespace().as_str());
            // What crates/kube/src/leader.rs calls: get_opt, create, replace.
            assert_eq!(
                rules(role),
                vec![(
                    s(&["coordination.k8s.io"]),
                    s(&["leases"]),
                    s(&["get", "create", "update"])
                )]
            );
        }

        let cluster_roles = r.all("ClusterRole");
        assert_eq!(
            cluster_roles.len(),
            usize::from(r.metrics_auth()),
            "{}",
            r.label
        );
        if let Some(cr) = cluster_roles.first() {
            assert_eq!(
                rules(cr),
                vec![
                    (
                        s(&["authentication.k8s.io"]),
                        s(&["tokenreviews"]),
                        s(&["create"])
                    ),
                    (
                        s(&["authorization.k8s.io"]),
                        s(&["subjectaccessreviews"]),
                        s(&["create"])
                    ),
                    (vec![], s(&["/metrics"]), s(&["get"])),
                ]
            );
        }

        // Every binding binds the chart's service account to a role the chart renders.
        for kind in ["RoleBinding", "ClusterRoleBinding"] {
            for b in r.all(kind) {
                assert_eq!(b["subjects"][0]["name"], sa_name);
                assert_eq!(b["subjects"][0]["namespace"], NAMESPACE);
                let role_kind = b["roleRef"]["kind"].as_str().unwrap();
                let role = b["roleRef"]["name"].as_str().unwrap();
                assert!(r.named(role_kind, role).is_some(), "{}: {role}", r.label);
                if kind == "RoleBinding" {
                    assert_eq!(
                        b["metadata"]["namespace"],
                        r.named(role_kind, role).unwrap()["metadata"]["namespace"]
                    );
                }
            }
        }
        assert_eq!(
            r.all("RoleBinding").len() + r.all("ClusterRoleBinding").len(),
            r.all("Role").len() + r.all("ClusterRole").len()
        );
    }
}

#[test]
fn servicemonitor_scrapes_the_metrics_port_with_the_account_token() {
    for r in renders() {
        let monitors = r.all("ServiceMonitor");
        let enabled = r.values["metrics"]["serviceMonitor"]["enabled"] == true;
        assert_eq!(monitors.len(), usize::from(enabled), "{}", r.label);
        let Some(m) = monitors.first() else { continue };
        assert_eq!(m["apiVersion"], "monitoring.coreos.com/v1");
        let service = r.one("Service");
        for (k, v) in m["spec"]["selector"]["matchLabels"].as_object().unwrap() {
            assert_eq!(&service["metadata"]["labels"][k], v, "{}: {k}", r.label);
        }
        assert_eq!(
            m["spec"]["namespaceSelector"]["matchNames"],
            json!([NAMESPACE])
        );
        let endpoint = &m["spec"]["endpoints"][0];
        assert_eq!(endpoint["port"], "http-metrics");
        assert_eq!(endpoint["path"], "/metrics");
        assert_eq!(
            endpoint["interval"],
            r.values["metrics"]["serviceMonitor"]["interval"]
        );
        for (k, v) in r.values["metrics"]["serviceMonitor"]["extraLabels"]
            .as_object()
            .unwrap()
        {
            assert_eq!(&m["metadata"]["labels"][k], v);
        }
        if r.metrics_auth() {
            let secret_name = endpoint["authorization"]["credentials"]["name"]
                .as_str()
                .unwrap();
            assert_eq!(endpoint["authorization"]["credentials"]["key"], "token");
            let secret = r.named("Secret", secret_name).unwrap();
            assert_eq!(secret["type"], "kubernetes.io/service-account-token");
            assert_eq!(
                secret["metadata"]["annotations"]["kubernetes.io/service-account.name"],
                r.one("ServiceAccount")["metadata"]["name"]
            );
        } else {
            assert!(endpoint.get("authorization").is_none());
        }
    }
}

/// Standalone mode: the init container's exact command, run with the built binary, writes a
/// bootstrap a real Envoy accepts, at the path the Envoy container reads, and it talks to
/// the EPP the way the EPP serves (TLS or not, its ports).
#[test]
fn standalone_envoy_bootstrap_is_accepted_by_envoy() {
    let envoy = tool(Tool::Envoy);
    let dir = tempfile::tempdir().unwrap();
    let mut generated = 0;
    for r in renders().into_iter().filter(|r| r.mode() == "standalone") {
        let pod = r.pod();
        let envoy_c = r.container("envoy").unwrap();
        let envoy_args: Vec<&str> = envoy_c["args"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a.as_str().unwrap())
            .collect();
        let cfg_pos = envoy_args
            .iter()
            .position(|a| *a == "--config-path")
            .unwrap();
        let cfg_path = Path::new(envoy_args[cfg_pos + 1]);
        let mount = |c: &Value| -> String {
            c["volumeMounts"]
                .as_array()
                .unwrap()
                .iter()
                .find(|m| cfg_path.starts_with(m["mountPath"].as_str().unwrap()))
                .unwrap_or_else(|| panic!("{}: {cfg_path:?} is not mounted", r.label))["name"]
                .as_str()
                .unwrap()
                .to_string()
        };
        let volume = mount(envoy_c);
        let local = dir.path().join(format!("{}.envoy.yaml", r.label));

        let bootstrap = r.values["envoy"]["bootstrap"].as_str().unwrap_or_default();
        if bootstrap.is_empty() {
            let inits = pod["initContainers"].as_array().unwrap();
            assert_eq!(inits.len(), 1);
            let init = &inits[0];
            assert_eq!(mount(init), volume, "{}", r.label);
            assert_eq!(init["image"], r.container("epp").unwrap()["image"]);
            let command: Vec<&str> = init["command"]
                .as_array()
                .unwrap()
                .iter()
                .map(|a| a.as_str().unwrap())
                .collect();
            assert_eq!(command, ["/llmsched", "envoy-config"], "{}", r.label);
            let mut args: Vec<String> = init["args"]
                .as_array()
                .unwrap()
                .iter()
                .map(|a| a.as_str().unwrap().to_string())
                .collect();
            let out_pos = args.iter().position(|a| a == "--output").unwrap();
            assert_eq!(Path::new(&args[out_pos + 1]), cfg_path, "{}", r.label);
            args[out_pos + 1] = local.display().to_string();
            let out = run(Command::new(env!("CARGO_BIN_EXE_llmsched"))
                .arg("envoy-config")
                .args(&args));
            assert!(out.status.success(), "{}: {}", r.label, both(&out));
            generated += 1;

            let text = std::fs::read_to_string(&local).unwrap();
            let b: Value = serde_norway::from_str(&text).unwrap();
            let listener = &b["static_resources"]["listeners"][0]["address"]["socket_address"];
            assert_eq!(
                listener["port_value"], r.values["envoy"]["port"],
                "{}",
                r.label
            );
            let epp_cluster = b["static_resources"]["clusters"]
                .as_array()
                .unwrap()
                .iter()
                .find(|c| c["name"] == "llmsched_epp")
                .unwrap();
            let epp_addr =
                &epp_cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"];
            assert_eq!(
                epp_addr["address"]["socket_address"]["port_value"],
                r.values["ports"]["grpc"]
            );
            assert_eq!(
                epp_addr["health_check_config"]["port_value"],
                r.values["ports"]["health"]
            );
            let epp_tls = r.values["flags"]["secure-serving"] != false;
            assert_eq!(
                epp_cluster.get("transport_socket").is_some(),
                epp_tls,
                "{}: Envoy must speak TLS to the EPP exactly when it serves TLS",
                r.label
            );
        } else {
            assert!(pod.get("initContainers").is_none(), "{}", r.label);
            let cm = r
                .named("ConfigMap", &format!("{}-envoy", r.fullname()))
                .unwrap();
            let cm_volume = pod["volumes"]
                .as_array()
                .unwrap()
                .iter()
                .find(|v| v["name"] == volume.as_str())
                .unwrap();
            assert_eq!(cm_volume["configMap"]["name"], cm["metadata"]["name"]);
            std::fs::write(&local, cm["data"]["envoy.yaml"].as_str().unwrap()).unwrap();
        }

        let out = run(Command::new(&envoy)
            .args(["--mode", "validate", "--config-path"])
            .arg(&local)
            .args(["--log-level", "warn"]));
        assert!(
            out.status.success(),
            "{}: Envoy rejects the bootstrap: {}",
            r.label,
            both(&out)
        );
    }
    assert!(
        generated >= 2,
        "only {generated} generated bootstraps checked"
    );
}

#[test]
fn values_that_must_fail_do_fail() {
    let dir = repo_root().join("deploy/tests/bad-values");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    assert!(files.len() >= 10, "only {} bad values files", files.len());
    // [refused by values.schema.json, refused by a template check]
    let mut schema_or_template = [0usize; 2];
    for f in files {
        let text = std::fs::read_to_string(&f).unwrap();
        let expect = text
            .lines()
            .find_map(|l| l.strip_prefix("# expect: "))
            .unwrap_or_else(|| panic!("{}: no `# expect:` line", f.display()));
        let err = helm_template(Some(&f))
            .err()
            .unwrap_or_else(|| panic!("{}: helm template accepted it", f.display()));
        assert!(
            err.contains(expect),
            "{}: expected {expect:?} in {err}",
            f.display()
        );
        // helm lint fails on schema violations; a template's `fail` only logs in lint mode
        // (Helm renders leniently there), so then the log must carry it.
        let out = run(helm()
            .args(["lint", "--strict"])
            .arg(chart())
            .arg("--values")
            .arg(&f));
        let lint = both(&out);
        assert!(
            (!out.status.success() && lint.contains(expect)) || lint.contains("funcMap fail"),
            "{}: helm lint accepted it: {lint}",
            f.display()
        );
        schema_or_template[usize::from(out.status.success())] += 1;
    }
    assert!(
        schema_or_template[0] >= 10 && schema_or_template[1] >= 3,
        "{schema_or_template:?}"
    );
    // --set goes through the same schema.
    let out = run(helm()
        .args(["template", RELEASE])
        .arg(chart())
        .args(["--set", "replicas=0"]));
    assert!(
        !out.status.success() && both(&out).contains("/replicas"),
        "{}",
        both(&out)
    );
}

/// The chart's config files are llmsched's built-in ones (a stale copy would silently deploy
/// different weights than the binary's default).
#[test]
fn chart_config_files_are_the_built_in_ones() {
    let yaml = |s: &str| -> Value { serde_norway::from_str(s).unwrap() };
    let file = |name: &str| std::fs::read_to_string(chart().join("files").join(name)).unwrap();
    assert_eq!(
        yaml(&file("default-plugins.yaml")),
        yaml(llmsched_core::config::DEFAULT_CONFIG_YAML)
    );
    assert_eq!(
        yaml(&file("reference-default.yaml")),
        yaml(llmsched_core::config::REFERENCE_DEFAULT_CONFIG_YAML)
    );
    let r = Render::new(None);
    let cm = r.named("ConfigMap", &r.fullname()).unwrap();
    assert_eq!(
        yaml(cm["data"]["default-plugins.yaml"].as_str().unwrap()),
        yaml(llmsched_core::config::DEFAULT_CONFIG_YAML)
    );
    // The config checksum annotation rolls the pods when the configuration changes.
    let checksum = |r: &Render| {
        r.pod();
        r.one("Deployment")["spec"]["template"]["metadata"]["annotations"]["checksum/config"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let other = Render::new(Some(&chart().join("ci/endpoint-selector-values.yaml")));
    assert_ne!(checksum(&r), checksum(&other));
    assert!(r.text.contains("default-plugins.yaml"));
}

/// README's helmfile override: valid YAML that changes `inferenceExtension.image` and nothing
/// else, pointing at the image the Dockerfile documents.
#[test]
fn readme_helmfile_override_swaps_only_the_image() {
    let readme = std::fs::read_to_string(repo_root().join("README.md")).unwrap();
    let start = "<!-- helmfile-image-override -->";
    let at = readme
        .find(start)
        .expect("README has no <!-- helmfile-image-override --> snippet");
    let rest = &readme[at + start.len()..];
    let body = rest
        .trim_start()
        .strip_prefix("```yaml\n")
        .expect("a ```yaml block follows the marker");
    let snippet = &body[..body.find("```").unwrap()];
    let v: Value = serde_norway::from_str(snippet).unwrap();
    let top: Vec<&String> = v.as_object().unwrap().keys().collect();
    assert_eq!(top, ["inferenceExtension"], "{snippet}");
    let ie: Vec<&String> = v["inferenceExtension"]
        .as_object()
        .unwrap()
        .keys()
        .collect();
    assert_eq!(ie, ["image"], "{snippet}");
    let image = &v["inferenceExtension"]["image"];
    let keys: BTreeSet<&str> = image
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    // The inferencepool chart's image fields (its template: {{hub}}/{{name}}:{{tag}}).
    assert!(
        keys.is_subset(&BTreeSet::from(["hub", "name", "tag", "pullPolicy"])) && keys.len() >= 3,
        "{snippet}"
    );
    let reference = format!(
        "{}/{}",
        image["hub"].as_str().unwrap(),
        image["name"].as_str().unwrap()
    );
    let values: Value =
        serde_norway::from_str(&std::fs::read_to_string(chart().join("values.yaml")).unwrap())
            .unwrap();
    assert_eq!(reference, values["image"]["repository"].as_str().unwrap());
    let dockerfile = std::fs::read_to_string(repo_root().join("Dockerfile")).unwrap();
    assert!(dockerfile.contains(&format!("docker build -t {reference}:")));
}

/// The README's `helm install` examples work as written (rendered with `helm template`, the
/// same arguments, through bash so the quoting is the user's).
#[test]
fn readme_helm_install_examples_render() {
    let readme = std::fs::read_to_string(repo_root().join("README.md")).unwrap();
    let section = &readme[readme
        .find("### Our chart: `deploy/helm/llmsched`")
        .expect("README section `Our chart`")..];
    let block = section
        .split("```sh\n")
        .nth(1)
        .and_then(|b| b.split("```").next())
        .unwrap();
    let installs = block.matches("helm install ").count();
    assert!(installs >= 2, "{block}");
    let script = format!(
        "set -euo pipefail\nhelm() {{ [ \"$1\" = install ] || exit 9; shift; \"$HELM\" template \"$@\" --include-crds >> \"$OUT\"; echo --- >> \"$OUT\"; }}\n{block}"
    );
    let dir = tempfile::tempdir().unwrap();
    let out_file = dir.path().join("rendered.yaml");
    let out = run(Command::new("bash")
        .arg("-c")
        .arg(&script)
        .env("HELM", tool(Tool::Helm))
        .env("OUT", &out_file)
        .current_dir(repo_root()));
    assert!(out.status.success(), "{}", both(&out));
    let docs = yaml_docs(&std::fs::read_to_string(&out_file).unwrap());
    let deployments = docs.iter().filter(|d| d["kind"] == "Deployment").count();
    assert_eq!(deployments, installs);
    assert!(docs.iter().any(|d| d["kind"] == "InferencePool"));
}
