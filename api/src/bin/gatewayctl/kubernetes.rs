//! The little of the Kubernetes API a gateway pod's preStop needs: how many pods its
//! StatefulSet wants now.

use shared::{Error, Result};

/// Where Kubernetes mounts a pod's service account; `SERVICE_ACCOUNT_DIR` elsewhere (tests).
const ACCOUNT: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

/// The StatefulSet's first ordinal and desired replicas, read with the pod's service
/// account (its token, its namespace and the cluster's CA, as Kubernetes mounts them).
pub async fn desired_ordinals(statefulset: &str) -> Result<(u64, u64)> {
    let unavailable = |what: &str, e: &dyn std::fmt::Display| {
        Error::unavailable(format!(
            "cannot read StatefulSet {statefulset}: {what}: {e}"
        ))
    };
    let account = std::env::var("SERVICE_ACCOUNT_DIR").unwrap_or_else(|_| ACCOUNT.into());
    let read = |file: &str| {
        std::fs::read(format!("{account}/{file}"))
            .map_err(|e| unavailable(&format!("{account}/{file}"), &e))
    };
    let (token, namespace, ca) = (read("token")?, read("namespace")?, read("ca.crt")?);
    let host = std::env::var("KUBERNETES_SERVICE_HOST")
        .map_err(|e| unavailable("KUBERNETES_SERVICE_HOST", &e))?;
    let port = std::env::var("KUBERNETES_SERVICE_PORT").unwrap_or_else(|_| "443".into());
    let ca = reqwest::Certificate::from_pem(&ca).map_err(|e| unavailable("ca.crt", &e))?;
    let http = api::http_client()
        .tls_certs_only([ca])
        .timeout(std::time::Duration::from_secs(10))
        .build()
        .map_err(|e| unavailable("client", &e))?;
    let url = format!(
        "https://{host}:{port}/apis/apps/v1/namespaces/{}/statefulsets/{statefulset}",
        String::from_utf8_lossy(&namespace).trim()
    );
    let sts: serde_json::Value = http
        .get(&url)
        .bearer_auth(String::from_utf8_lossy(&token).trim())
        .send()
        .await
        .and_then(reqwest::Response::error_for_status)
        .map_err(|e| unavailable(&url, &e))?
        .json()
        .await
        .map_err(|e| unavailable(&url, &e))?;
    let spec = &sts["spec"];
    Ok((
        spec["ordinals"]["start"].as_u64().unwrap_or(0),
        spec["replicas"].as_u64().unwrap_or(1),
    ))
}

/// Whether the gateway's pod (`gw-sg-3`: ordinal 3) is among the `replicas` pods counted
/// from `start`.
pub fn kept(gateway_id: &str, start: u64, replicas: u64) -> Result<bool> {
    let ordinal: u64 = gateway_id
        .rsplit('-')
        .next()
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| Error::invalid(format!("{gateway_id} is not a StatefulSet pod's name")))?;
    Ok(ordinal < start + replicas)
}

#[cfg(test)]
mod tests {
    use super::kept;

    #[test]
    fn a_scale_down_removes_the_highest_ordinals_only() {
        // gw-sg-1 … gw-sg-3, scaled from 3 to 2: gw-sg-3 goes, the others restart.
        let kept = |id, start, replicas| kept(id, start, replicas).ok();
        assert_eq!(kept("gw-sg-1", 1, 2), Some(true));
        assert_eq!(kept("gw-sg-2", 1, 2), Some(true));
        assert_eq!(kept("gw-sg-3", 1, 2), Some(false));
        assert_eq!(kept("gw-sg-1", 1, 0), Some(false), "scaled to zero");
        assert_eq!(kept("gw-eu-west-0", 0, 1), Some(true));
        assert_eq!(kept("local", 1, 2), None);
    }
}
