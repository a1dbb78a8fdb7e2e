//! Playback key Secrets on a real kube-apiserver: the operator creates one in each served
//! namespace, rotates it with two keys live, and a sidecar reading the Secret accepts tokens
//! of both keys during the rotation and refuses the old key's once it is gone.

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use chrono::{DateTime, Utc};
use k8s_openapi::api::core::v1::Secret;
use kube::{Api, Client};
use streamgate_operator::metrics::Metrics;
use streamgate_operator::playback_keys::{ensure_keys, key_set_of};
use streamgate_policy::playback_keys::{PlaybackKeySet, RotationSchedule, SECRET_NAME};
use streamgate_sidecar::playback::{self, Claims, KeyRing, TokenError};
use streamgate_sidecar::session::SessionId;
use streamgate_testenv::{create_namespace, install_crds, wait_until, workspace_root};

const WAIT: Duration = Duration::from_secs(60);

async fn key_set(client: &Client, ns: &str) -> Result<PlaybackKeySet> {
    let secret = Api::<Secret>::namespaced(client.clone(), ns)
        .get(SECRET_NAME)
        .await
        .context("the key Secret")?;
    key_set_of(&secret).context("the Secret holds a key set")
}

/// What a sidecar with the Secret mounted would verify with.
async fn sidecar_ring(client: &Client, ns: &str) -> Result<KeyRing> {
    KeyRing::from_key_set(&key_set(client, ns).await?).map_err(anyhow::Error::msg)
}

fn token(ring: &KeyRing) -> String {
    playback::mint(
        ring,
        &Claims {
            session: SessionId::for_account("acct"),
            account: "acct".into(),
            stream_id: "tv".into(),
            network: None,
            expires_at: i64::MAX,
        },
    )
}

fn at(minutes: i64) -> DateTime<Utc> {
    DateTime::<Utc>::from_timestamp(1_800_000_000, 0).unwrap() + chrono::Duration::minutes(minutes)
}

#[tokio::test]
async fn keys_are_created_rotated_with_two_live_and_retired_on_the_api_server() -> Result<()> {
    let cp = streamgate_testenv::shared().await?;
    let client = cp.client().await?;
    let ns = create_namespace(&client, "keys", &[]).await?;
    let schedule = RotationSchedule {
        rotate_after: chrono::Duration::minutes(60),
        propagation: chrono::Duration::minutes(5),
        retire_grace: chrono::Duration::minutes(10),
    };

    // Created: one key, which signs; the Secret is labelled as the operator's.
    let due = ensure_keys(&client, &ns, at(0), &schedule).await?;
    ensure!(due == Some(at(60)), "next change at {due:?}");
    let first = key_set(&client, &ns).await?;
    ensure!(first.keys.len() == 1 && first.signing == first.keys[0].id);
    let secret = Api::<Secret>::namespaced(client.clone(), &ns)
        .get(SECRET_NAME)
        .await?;
    ensure!(
        secret
            .metadata
            .labels
            .unwrap_or_default()
            .get("app.kubernetes.io/managed-by")
            == Some(&"streamgate-operator".to_string())
    );
    let old_ring = sidecar_ring(&client, &ns).await?;
    let old_token = token(&old_ring);
    // Nothing due: nothing written.
    let version = Api::<Secret>::namespaced(client.clone(), &ns)
        .get(SECRET_NAME)
        .await?
        .metadata
        .resource_version;
    ensure_keys(&client, &ns, at(30), &schedule).await?;
    let unchanged = Api::<Secret>::namespaced(client.clone(), &ns)
        .get(SECRET_NAME)
        .await?
        .metadata
        .resource_version;
    ensure!(
        version == unchanged,
        "a reconcile with nothing due wrote the Secret"
    );

    // Due: a second key verifies before it signs.
    ensure_keys(&client, &ns, at(60), &schedule).await?;
    let added = key_set(&client, &ns).await?;
    ensure!(
        added.keys.len() == 2 && added.signing == first.signing,
        "{added:?}"
    );
    ensure!(playback::verify(&sidecar_ring(&client, &ns).await?, &old_token, 0, None).is_ok());

    // Propagated: the new key signs; both verify.
    ensure_keys(&client, &ns, at(65), &schedule).await?;
    let rotating = sidecar_ring(&client, &ns).await?;
    ensure!(rotating.signing_key_id() != first.signing);
    let new_token = token(&rotating);
    ensure!(
        playback::verify(&rotating, &old_token, 0, None).is_ok(),
        "old key verifies during rotation"
    );
    ensure!(playback::verify(&rotating, &new_token, 0, None).is_ok());

    // Retired: the old key is gone, its tokens refused; the new one's still work.
    ensure_keys(&client, &ns, at(75), &schedule).await?;
    let rotated = sidecar_ring(&client, &ns).await?;
    ensure!(rotated.key_ids().count() == 1);
    ensure!(
        playback::verify(&rotated, &old_token, 0, None) == Err(TokenError::UnknownKey),
        "the old key's token is refused"
    );
    ensure!(playback::verify(&rotated, &new_token, 0, None).is_ok());
    Ok(())
}

#[tokio::test]
async fn the_running_operator_gives_an_opted_in_namespace_its_keys() -> Result<()> {
    let cp = streamgate_testenv::shared().await?;
    let client = cp.client().await?;
    install_crds(&client, &workspace_root().join("crds/streamingpolicy.yaml")).await?;
    let kubeconfig = cp.kubeconfig_path().to_path_buf();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Runtime::new().expect("a runtime");
        runtime.block_on(async move {
            let config = kube::Config::from_custom_kubeconfig(
                kube::config::Kubeconfig::read_from(&kubeconfig).expect("kubeconfig"),
                &kube::config::KubeConfigOptions::default(),
            )
            .await
            .expect("kube config");
            let client = Client::try_from(config).expect("client");
            streamgate_operator::run_controller(
                client,
                std::sync::Arc::new(Metrics::new()),
                Default::default(),
            )
            .await;
        });
    });
    let opted_in =
        create_namespace(&client, "keys-in", &[("streamgate.dev/inject", "enabled")]).await?;
    let secrets = Api::<Secret>::namespaced(client.clone(), &opted_in);
    wait_until(WAIT, "the opted-in namespace has its key Secret", || {
        let secrets = secrets.clone();
        async move { Ok(secrets.get_opt(SECRET_NAME).await?.is_some()) }
    })
    .await?;
    let ring = sidecar_ring(&client, &opted_in).await?;
    ensure!(ring.key_ids().count() == 1);
    Ok(())
}
