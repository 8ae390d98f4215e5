//! The real kube-rs client against `llmsched-kubetest`: CRUD, selectors, custom resources,
//! discovery, Lease conflicts, TokenReview/SubjectAccessReview, injected faults.
//!
//! Why not a real API server: none can run here (kube-apiserver, k3s, kind and envtest are
//! not obtainable from the package registries; there is no container runtime). The test
//! server speaks the real REST wire protocol, so what passes here is what kube-rs does
//! against a cluster.

#![allow(clippy::unwrap_used)] // tests may unwrap (team rule: no unwrap outside tests)

mod common;

use std::collections::BTreeMap;

use common::{api_code, client, eventually};
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use k8s_openapi::api::authorization::v1::{
    NonResourceAttributes, ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec,
};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{
    Api, ApiResource, DeleteParams, DynamicObject, GroupVersionKind, ListParams, Patch,
    PatchParams, PostParams,
};
use kube::core::ObjectMeta;
use llmsched_kubetest::{
    ApiStatus, FaultRule, Permission, ResourceKind, TestApiServer, UserInfo, objects,
};
use serde_json::json;

fn pod(name: &str, labels: &[(&str, &str)]) -> Pod {
    serde_json::from_value(objects::pod("llm-d", name, labels, "127.0.0.9", true)).unwrap()
}

/// Not a real API server (none can run here): kubetest speaks its REST protocol.
#[tokio::test]
async fn pod_crud_through_kube_rs() {
    let server = TestApiServer::start().await.unwrap();
    let client = client(&server).await;
    let pods_client = client.clone();
    let pods: Api<Pod> = Api::namespaced(client, "llm-d");

    let created = pods
        .create(&PostParams::default(), &pod("vllm-0", &[("app", "vllm")]))
        .await
        .unwrap();
    let meta = &created.metadata;
    assert_eq!(meta.namespace.as_deref(), Some("llm-d"));
    assert!(meta.uid.as_ref().is_some_and(|u| !u.is_empty()));
    assert!(meta.creation_timestamp.is_some());
    let rv1: u64 = meta.resource_version.as_deref().unwrap().parse().unwrap();
    // As the real server: create through the API drops the status (pods have /status).
    assert!(
        created
            .status
            .as_ref()
            .and_then(|s| s.pod_ip.as_ref())
            .is_none()
    );

    // A second create of the same name: 409 AlreadyExists.
    let err = pods
        .create(&PostParams::default(), &pod("vllm-0", &[]))
        .await
        .unwrap_err();
    match &err {
        kube::Error::Api(s) => {
            assert_eq!((s.code, s.reason.as_str()), (409, "AlreadyExists"));
            assert_eq!(s.message, "pods \"vllm-0\" already exists");
        }
        other => panic!("expected an API error, got {other:?}"),
    }

    // Status through /status, as a kubelet does.
    let status = json!({"status": {"podIP": "127.0.0.5", "conditions": [{"type": "Ready", "status": "True"}]}});
    let with_status = pods
        .patch_status("vllm-0", &PatchParams::default(), &Patch::Merge(&status))
        .await
        .unwrap();
    assert_eq!(
        with_status.status.unwrap().pod_ip.as_deref(),
        Some("127.0.0.5")
    );
    let rv2: u64 = with_status
        .metadata
        .resource_version
        .unwrap()
        .parse()
        .unwrap();
    assert!(rv2 > rv1, "every write takes a higher resourceVersion");

    // Replace keeps the status (main resource ignores status changes) and bumps generation
    // only for spec changes.
    let mut current = pods.get("vllm-0").await.unwrap();
    current
        .metadata
        .labels
        .get_or_insert_with(BTreeMap::new)
        .insert("tier".into(), "gpu".into());
    current.status = None;
    let replaced = pods
        .replace("vllm-0", &PostParams::default(), &current)
        .await
        .unwrap();
    assert_eq!(replaced.metadata.generation, Some(1));
    assert_eq!(
        replaced.status.unwrap().pod_ip.as_deref(),
        Some("127.0.0.5")
    );

    // JSON patch (RFC 6902), sent as kubectl patch --type json does.
    let req = http::Request::patch("/api/v1/namespaces/llm-d/pods/vllm-0")
        .header("content-type", "application/json-patch+json")
        .body(
            serde_json::to_vec(&json!([
                {"op": "add", "path": "/metadata/annotations", "value": {"a": "b"}},
                {"op": "replace", "path": "/metadata/labels/tier", "value": "cpu"}
            ]))
            .unwrap(),
        )
        .unwrap();
    let patched: Pod = pods_client.request(req).await.unwrap();
    assert_eq!(patched.metadata.labels.unwrap()["tier"], "cpu");
    assert_eq!(patched.metadata.annotations.unwrap()["a"], "b");

    // Delete: gone, then 404.
    let deleted = pods
        .delete("vllm-0", &DeleteParams::default())
        .await
        .unwrap();
    assert!(deleted.is_left());
    let err = pods.get("vllm-0").await.unwrap_err();
    assert_eq!(api_code(&err), Some(404));
    assert!(pods.get_opt("vllm-0").await.unwrap().is_none());
}

/// Not a real API server (none can run here): kubetest speaks its REST protocol.
#[tokio::test]
async fn list_with_label_and_field_selectors() {
    let server = TestApiServer::start().await.unwrap();
    let pods: Api<Pod> = Api::namespaced(client(&server).await, "llm-d");
    for (name, labels) in [
        ("a", vec![("app", "vllm"), ("role", "prefill")]),
        ("b", vec![("app", "vllm"), ("role", "decode")]),
        ("c", vec![("app", "sglang")]),
    ] {
        pods.create(&PostParams::default(), &pod(name, &labels))
            .await
            .unwrap();
    }
    // Another namespace must not leak into a namespaced list.
    Api::<Pod>::namespaced(client(&server).await, "other")
        .create(&PostParams::default(), &{
            let mut p = pod("a", &[("app", "vllm")]);
            p.metadata.namespace = Some("other".into());
            p
        })
        .await
        .unwrap();

    let names = |l: kube::core::ObjectList<Pod>| -> Vec<String> {
        l.items
            .into_iter()
            .map(|p| p.metadata.name.unwrap())
            .collect()
    };
    let lp = |s: &str| ListParams::default().labels(s);
    assert_eq!(names(pods.list(&lp("app=vllm")).await.unwrap()), ["a", "b"]);
    assert_eq!(
        names(pods.list(&lp("app=vllm,role!=decode")).await.unwrap()),
        ["a"]
    );
    assert_eq!(
        names(pods.list(&lp("app in (sglang,tgi)")).await.unwrap()),
        ["c"]
    );
    assert_eq!(names(pods.list(&lp("!role")).await.unwrap()), ["c"]);
    assert_eq!(
        names(
            pods.list(&ListParams::default().fields("metadata.name=b"))
                .await
                .unwrap()
        ),
        ["b"]
    );
    let all: Api<Pod> = Api::all(client(&server).await);
    assert_eq!(all.list(&lp("app=vllm")).await.unwrap().items.len(), 3);
    let list = pods.list(&ListParams::default()).await.unwrap();
    assert_eq!(
        list.metadata.resource_version.as_deref(),
        Some(server.resource_version().to_string().as_str())
    );

    // Paging: limit + continue walks every item exactly once.
    let mut seen = Vec::new();
    let mut page_params = ListParams::default().limit(1);
    loop {
        let page = all.list(&page_params).await.unwrap();
        let cont = page.metadata.continue_.clone();
        seen.extend(page.items.into_iter().map(|p| {
            format!(
                "{}/{}",
                p.metadata.namespace.unwrap(),
                p.metadata.name.unwrap()
            )
        }));
        match cont {
            Some(c) if !c.is_empty() => page_params = page_params.continue_token(&c),
            _ => break,
        }
    }
    assert_eq!(seen, ["llm-d/a", "llm-d/b", "llm-d/c", "other/a"]);

    // A malformed selector is a 400 with the server's parse message.
    let err = pods.list(&lp("app in vllm")).await.unwrap_err();
    assert_eq!(api_code(&err), Some(400));
    let err = pods
        .list(&ListParams::default().fields("spec.containers=x"))
        .await
        .unwrap_err();
    match err {
        kube::Error::Api(s) => assert_eq!(s.message, "field label not supported: spec.containers"),
        other => panic!("{other:?}"),
    }
}

fn pool_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("inference.networking.k8s.io", "v1", "InferencePool"),
        "inferencepools",
    )
}

/// Not a real API server (none can run here): kubetest speaks its REST protocol.
#[tokio::test]
async fn custom_resource_crud_and_status() {
    let server = TestApiServer::start().await.unwrap();
    let client = client(&server).await;
    let ar = pool_resource();
    let pools: Api<DynamicObject> = Api::namespaced_with(client.clone(), "llm-d", &ar);

    // Before the CRD is installed, the resource does not exist.
    let err = pools.list(&ListParams::default()).await.unwrap_err();
    assert_eq!(api_code(&err), Some(404));

    server.register_inference_extension_kinds();
    let obj: DynamicObject = serde_json::from_value(objects::inference_pool_v1(
        "llm-d",
        "pool",
        &[("app", "vllm")],
        &[8000, 8001],
    ))
    .unwrap();
    let created = pools.create(&PostParams::default(), &obj).await.unwrap();
    assert_eq!(created.metadata.generation, Some(1));
    assert_eq!(created.data["spec"]["targetPorts"][1]["number"], 8001);

    // Spec change bumps generation; a status write through /status does not.
    let spec = json!({"spec": {"targetPorts": [{"number": 9000}]}});
    let p = pools
        .patch("pool", &PatchParams::default(), &Patch::Merge(&spec))
        .await
        .unwrap();
    assert_eq!(p.metadata.generation, Some(2));
    let status = json!({"status": {"parents": [{"parentRef": {"name": "gw"}, "conditions": [{"type": "Accepted", "status": "True"}]}]}});
    let s = pools
        .patch_status("pool", &PatchParams::default(), &Patch::Merge(&status))
        .await
        .unwrap();
    assert_eq!(s.metadata.generation, Some(2));
    assert_eq!(s.data["status"]["parents"][0]["parentRef"]["name"], "gw");
    // A status change through the main resource is ignored (status subresource semantics).
    let sneaky = json!({"status": {"parents": []}});
    let p = pools
        .patch("pool", &PatchParams::default(), &Patch::Merge(&sneaky))
        .await
        .unwrap();
    assert_eq!(p.data["status"]["parents"][0]["parentRef"]["name"], "gw");

    // Server-side apply of a new object creates it.
    let applied: DynamicObject = serde_json::from_value(objects::inference_pool_v1(
        "llm-d",
        "applied",
        &[("app", "x")],
        &[8000],
    ))
    .unwrap();
    let a = pools
        .patch(
            "applied",
            &PatchParams::apply("kubetest-test").force(),
            &Patch::Apply(&applied),
        )
        .await
        .unwrap();
    assert_eq!(a.metadata.name.as_deref(), Some("applied"));
    assert_eq!(
        pools
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
            .len(),
        2
    );

    // The legacy group is a different resource, the objects do not mix.
    let legacy = ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("inference.networking.x-k8s.io", "v1alpha2", "InferencePool"),
        "inferencepools",
    );
    let old: Api<DynamicObject> = Api::namespaced_with(client.clone(), "llm-d", &legacy);
    assert!(
        old.list(&ListParams::default())
            .await
            .unwrap()
            .items
            .is_empty()
    );

    pools
        .delete("pool", &DeleteParams::default())
        .await
        .unwrap();
    assert!(pools.get_opt("pool").await.unwrap().is_none());
}

/// Not a real API server (none can run here): kubetest speaks its REST protocol.
#[tokio::test]
async fn discovery_reports_installed_and_missing_groups() {
    let server = TestApiServer::start().await.unwrap();
    server.register(ResourceKind::inference_pools_v1());
    server.register(ResourceKind::inference_objectives(
        "inference.networking.x-k8s.io",
    ));
    let client = client(&server).await;

    let v = client.apiserver_version().await.unwrap();
    assert_eq!(v.major, "1");

    let discovery = kube::Discovery::new(client.clone()).run().await.unwrap();
    assert!(discovery.has_group("inference.networking.k8s.io"));
    assert!(discovery.has_group("coordination.k8s.io"));
    assert!(!discovery.has_group("llm-d.ai"));
    let (ar, caps) = discovery
        .resolve_gvk(&GroupVersionKind::gvk(
            "inference.networking.k8s.io",
            "v1",
            "InferencePool",
        ))
        .expect("InferencePool is discoverable");
    assert_eq!(ar.plural, "inferencepools");
    assert_eq!(caps.scope, kube::discovery::Scope::Namespaced);
    assert!(caps.supports_operation(kube::discovery::verbs::WATCH));
    let core = discovery.get("").expect("core group");
    assert!(core.recommended_kind("Pod").is_some());

    // The same through aggregated discovery (2 requests).
    let agg = kube::Discovery::new(client.clone())
        .run_aggregated()
        .await
        .unwrap();
    assert!(agg.has_group("inference.networking.x-k8s.io"));
    assert!(!agg.has_group("llm-d.ai"));

    // "Is this CRD installed?" the way a controller checks: 404 for a missing group.
    let err = client
        .list_api_group_resources("llm-d.ai/v1alpha2")
        .await
        .unwrap_err();
    assert_eq!(api_code(&err), Some(404));
    assert!(kube::discovery::group(&client, "llm-d.ai").await.is_err());
    let pinned = kube::discovery::pinned_group(
        &client,
        &kube::core::GroupVersion::gv("inference.networking.x-k8s.io", "v1alpha2"),
    )
    .await
    .unwrap();
    assert!(pinned.recommended_kind("InferenceObjective").is_some());

    // Installing a CRD through the API makes the group appear; deleting it removes it.
    let crds: Api<DynamicObject> = Api::all_with(
        client.clone(),
        &ApiResource::from_gvk_with_plural(
            &GroupVersionKind::gvk("apiextensions.k8s.io", "v1", "CustomResourceDefinition"),
            "customresourcedefinitions",
        ),
    );
    let crd: DynamicObject = serde_json::from_value(json!({
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": "inferenceobjectives.llm-d.ai"},
        "spec": {
            "group": "llm-d.ai",
            "scope": "Namespaced",
            "names": {"plural": "inferenceobjectives", "singular": "inferenceobjective", "kind": "InferenceObjective"},
            "versions": [{"name": "v1alpha2", "served": true, "storage": true, "subresources": {"status": {}},
                "schema": {"openAPIV3Schema": {"type": "object"}}}]
        }
    }))
    .unwrap();
    let created = crds.create(&PostParams::default(), &crd).await.unwrap();
    assert_eq!(
        created.data["status"]["conditions"][1]["type"],
        "Established"
    );
    assert!(kube::discovery::group(&client, "llm-d.ai").await.is_ok());
    crds.delete("inferenceobjectives.llm-d.ai", &DeleteParams::default())
        .await
        .unwrap();
    assert!(kube::discovery::group(&client, "llm-d.ai").await.is_err());
}

fn lease(holder: &str) -> Lease {
    serde_json::from_value(objects::lease("llm-d", "epp-lock", holder, 15)).unwrap()
}

/// Not a real API server (none can run here): kubetest speaks its REST protocol.
#[tokio::test]
async fn stale_lease_replace_conflicts() {
    let server = TestApiServer::start().await.unwrap();
    let leases: Api<Lease> = Api::namespaced(client(&server).await, "llm-d");
    let first = leases
        .create(&PostParams::default(), &lease("a"))
        .await
        .unwrap();

    // Two candidates read the same version; the first update wins...
    let mut mine = first.clone();
    mine.spec.as_mut().unwrap().holder_identity = Some("b".into());
    let won = leases
        .replace("epp-lock", &PostParams::default(), &mine)
        .await
        .unwrap();
    assert_eq!(
        won.spec.as_ref().unwrap().holder_identity.as_deref(),
        Some("b")
    );
    // ...the second, with the stale resourceVersion, gets 409 Conflict.
    let mut theirs = first.clone();
    theirs.spec.as_mut().unwrap().holder_identity = Some("c".into());
    let err = leases
        .replace("epp-lock", &PostParams::default(), &theirs)
        .await
        .unwrap_err();
    match err {
        kube::Error::Api(s) => {
            assert_eq!((s.code, s.reason.as_str()), (409, "Conflict"));
            assert_eq!(
                s.message,
                "Operation cannot be fulfilled on leases.coordination.k8s.io \"epp-lock\": the object has been modified; please apply your changes to the latest version and try again"
            );
        }
        other => panic!("{other:?}"),
    }
    // A merge patch carrying the stale resourceVersion conflicts too.
    let stale_rv = first.metadata.resource_version.clone().unwrap();
    let patch = json!({"metadata": {"resourceVersion": stale_rv}, "spec": {"holderIdentity": "d"}});
    let err = leases
        .patch("epp-lock", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap_err();
    assert_eq!(api_code(&err), Some(409));
    assert_eq!(
        leases
            .get("epp-lock")
            .await
            .unwrap()
            .spec
            .unwrap()
            .holder_identity
            .as_deref(),
        Some("b")
    );
    // Delete with a stale resourceVersion precondition conflicts; the current one works.
    let dp = DeleteParams {
        preconditions: Some(kube::api::Preconditions {
            resource_version: Some(stale_rv),
            uid: None,
        }),
        ..DeleteParams::default()
    };
    assert_eq!(
        api_code(&leases.delete("epp-lock", &dp).await.unwrap_err()),
        Some(409)
    );
    leases
        .delete("epp-lock", &DeleteParams::default())
        .await
        .unwrap();
}

/// Not a real API server (none can run here): kubetest speaks its REST protocol.
#[tokio::test]
async fn token_review_and_subject_access_review() {
    let server = TestApiServer::start().await.unwrap();
    server.add_token(
        "prom-token",
        UserInfo::service_account("monitoring", "prometheus"),
    );
    server.allow(Permission::non_resource(
        "system:serviceaccount:monitoring:prometheus",
        "get",
        "/metrics",
    ));
    server.allow(Permission::namespaced(
        "system:serviceaccounts:llm-d",
        "list",
        "",
        "pods",
        "llm-d",
    ));
    let client = client(&server).await;

    let reviews: Api<TokenReview> = Api::all(client.clone());
    let review = |token: &str| TokenReview {
        metadata: ObjectMeta::default(),
        spec: TokenReviewSpec {
            token: Some(token.into()),
            audiences: None,
        },
        status: None,
    };
    let ok = reviews
        .create(&PostParams::default(), &review("prom-token"))
        .await
        .unwrap();
    let st = ok.status.unwrap();
    assert_eq!(st.authenticated, Some(true));
    let user = st.user.unwrap();
    assert_eq!(
        user.username.as_deref(),
        Some("system:serviceaccount:monitoring:prometheus")
    );
    assert!(
        user.groups
            .unwrap()
            .contains(&"system:serviceaccounts".to_string())
    );
    let bad = reviews
        .create(&PostParams::default(), &review("nope"))
        .await
        .unwrap();
    assert_eq!(bad.status.unwrap().authenticated, Some(false));

    let sars: Api<SubjectAccessReview> = Api::all(client.clone());
    let sar =
        |user: &str, groups: Vec<String>, path: Option<&str>, res: Option<(&str, &str, &str)>| {
            SubjectAccessReview {
                metadata: ObjectMeta::default(),
                spec: SubjectAccessReviewSpec {
                    user: Some(user.into()),
                    groups: Some(groups),
                    non_resource_attributes: path.map(|p| NonResourceAttributes {
                        path: Some(p.into()),
                        verb: Some("get".into()),
                    }),
                    resource_attributes: res.map(|(verb, resource, ns)| ResourceAttributes {
                        verb: Some(verb.into()),
                        resource: Some(resource.into()),
                        namespace: Some(ns.into()),
                        ..ResourceAttributes::default()
                    }),
                    ..SubjectAccessReviewSpec::default()
                },
                status: None,
            }
        };
    let allowed = |s: SubjectAccessReview| s.status.unwrap().allowed;
    let pp = PostParams::default();
    assert!(allowed(
        sars.create(
            &pp,
            &sar(
                "system:serviceaccount:monitoring:prometheus",
                vec![],
                Some("/metrics"),
                None
            )
        )
        .await
        .unwrap()
    ));
    assert!(!allowed(
        sars.create(&pp, &sar("someone-else", vec![], Some("/metrics"), None))
            .await
            .unwrap()
    ));
    assert!(allowed(
        sars.create(
            &pp,
            &sar(
                "system:serviceaccount:llm-d:epp",
                vec!["system:serviceaccounts:llm-d".into()],
                None,
                Some(("list", "pods", "llm-d"))
            )
        )
        .await
        .unwrap()
    ));
    assert!(!allowed(
        sars.create(
            &pp,
            &sar(
                "system:serviceaccount:llm-d:epp",
                vec!["system:serviceaccounts:llm-d".into()],
                None,
                Some(("delete", "pods", "llm-d"))
            )
        )
        .await
        .unwrap()
    ));
    // A review without user or groups is refused as invalid (422), as the real server does.
    let err = sars
        .create(&pp, &sar("", vec![], Some("/metrics"), None))
        .await
        .unwrap_err();
    assert_eq!(api_code(&err), Some(422));
}

/// Not a real API server (none can run here): kubetest speaks its REST protocol.
#[tokio::test]
async fn injected_faults_surface_as_api_errors() {
    let server = TestApiServer::start().await.unwrap();
    let pods: Api<Pod> = Api::namespaced(client(&server).await, "llm-d");
    pods.create(&PostParams::default(), &pod("a", &[]))
        .await
        .unwrap();

    server.deny("list", "pods");
    let err = pods.list(&ListParams::default()).await.unwrap_err();
    match &err {
        kube::Error::Api(s) => {
            assert_eq!((s.code, s.reason.as_str()), (403, "Forbidden"));
            assert_eq!(
                s.message,
                "pods is forbidden: User \"kubetest-admin\" cannot list resource \"pods\" in API group \"\" in the namespace \"llm-d\""
            );
        }
        other => panic!("{other:?}"),
    }
    // Only list was denied.
    pods.get("a").await.unwrap();
    server.clear_faults();
    pods.list(&ListParams::default()).await.unwrap();

    // Any status, a counted number of times: two 500s, then success.
    server.inject(FaultRule::fail(
        "get",
        "pods",
        ApiStatus::internal("etcdserver: request timed out"),
        Some(2),
    ));
    for _ in 0..2 {
        let e = pods.get("a").await.unwrap_err();
        assert_eq!(api_code(&e), Some(500));
    }
    pods.get("a").await.unwrap();

    // Garbage bodies: a decode error, not a panic, and the client recovers afterwards.
    server.set_malformed("pods", true);
    let err = pods.list(&ListParams::default()).await.unwrap_err();
    assert!(
        matches!(err, kube::Error::SerdeError(_)),
        "expected a decode error, got {err:?}"
    );
    server.set_malformed("pods", false);
    assert_eq!(
        pods.list(&ListParams::default()).await.unwrap().items.len(),
        1
    );

    // The request log saw all of it.
    let log = server.requests();
    let denied = log.iter().filter(|r| r.status == 403).count();
    assert_eq!(denied, 1);
    assert!(log.iter().any(|r| r.verb == "get" && r.status == 500));
}

/// Not a real API server (none can run here): kubetest speaks its REST protocol.
#[tokio::test]
async fn rbac_enforcement_with_tokens() {
    let server = TestApiServer::builder()
        .require_token("admin")
        .authorize_requests(true)
        .start()
        .await
        .unwrap();
    server.add_token("epp-token", UserInfo::service_account("llm-d", "epp"));
    server.allow(Permission::namespaced(
        "system:serviceaccount:llm-d:epp",
        "*",
        "coordination.k8s.io",
        "leases",
        "llm-d",
    ));
    let epp = common::client_with(server.kubeconfig().token("epp-token")).await;
    let leases: Api<Lease> = Api::namespaced(epp.clone(), "llm-d");
    leases
        .create(&PostParams::default(), &lease("me"))
        .await
        .unwrap();
    // No rule for pods: 403 naming the service account.
    let err = Api::<Pod>::namespaced(epp.clone(), "llm-d")
        .list(&ListParams::default())
        .await
        .unwrap_err();
    match err {
        kube::Error::Api(s) => {
            assert_eq!(s.code, 403);
            assert!(
                s.message.contains(
                    "User \"system:serviceaccount:llm-d:epp\" cannot list resource \"pods\""
                ),
                "{}",
                s.message
            );
        }
        other => panic!("{other:?}"),
    }
    // Leases in another namespace: 403 too.
    let err = Api::<Lease>::namespaced(epp, "kube-system")
        .list(&ListParams::default())
        .await
        .unwrap_err();
    assert_eq!(api_code(&err), Some(403));
    // A wrong token: 401.
    let stranger = common::client_with(server.kubeconfig().token("wrong")).await;
    let err = Api::<Lease>::namespaced(stranger, "llm-d")
        .list(&ListParams::default())
        .await
        .unwrap_err();
    assert_eq!(api_code(&err), Some(401));
    // The admin sees everything.
    let admin = client(&server).await;
    assert_eq!(
        Api::<Lease>::all(admin)
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
            .len(),
        1
    );
    let users: Vec<String> = server.requests().into_iter().map(|r| r.user).collect();
    assert!(users.contains(&"system:serviceaccount:llm-d:epp".to_string()));
    assert!(users.contains(&String::new()), "the 401 has no user");
    eventually("log kept", || !server.requests().is_empty()).await;
}
