//! Where checkpoints are stored: one typed setting shared by the cell
//! and its workers.

use std::path::PathBuf;
use std::sync::Arc;

use object_store::aws::AmazonS3Builder;
use object_store::local::LocalFileSystem;
use object_store::{BackoffConfig, ClientOptions, ObjectStore, RetryConfig};
use serde::Deserialize;

use crate::{BlobError, REQUEST_TIMEOUT, RETRY_WINDOW};

/// The object store for checkpoints.
///
/// ```toml
/// [checkpoints]              # a local folder (the default)
/// kind = "local"
/// path = "/var/lib/cellvm/checkpoints"
///
/// [checkpoints]              # any S3 API
/// kind = "s3"
/// bucket = "cellvm-checkpoints"
/// endpoint = "http://127.0.0.1:9000"   # omit for AWS itself
/// region = "us-east-1"
/// access_key_id = "..."
/// secret_access_key = "..."
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum BlobConfig {
    /// A folder on this host (shared by every process given the same
    /// path; on one machine that makes it a store all workers reach).
    Local {
        /// The folder; created if missing.
        path: PathBuf,
    },
    /// An S3-compatible service.
    S3 {
        /// Bucket name; it must exist.
        bucket: String,
        /// Endpoint URL; AWS's own when absent.
        #[serde(default)]
        endpoint: Option<String>,
        /// Region.
        #[serde(default = "default_region")]
        region: String,
        /// Access key id.
        access_key_id: String,
        /// Secret access key.
        secret_access_key: String,
    },
}

fn default_region() -> String {
    "us-east-1".into()
}

/// The store and a name for logs.
pub(crate) fn build(
    cfg: &BlobConfig,
) -> Result<(Arc<dyn ObjectStore>, String), BlobError> {
    match cfg {
        BlobConfig::Local { path } => {
            std::fs::create_dir_all(path)
                .map_err(|e| BlobError::io("creating", path, e))?;
            let store = LocalFileSystem::new_with_prefix(path)
                .map_err(|e| BlobError::Config(e.to_string()))?
                .with_automatic_cleanup(true);
            Ok((Arc::new(store), path.display().to_string()))
        }
        BlobConfig::S3 {
            bucket,
            endpoint,
            region,
            access_key_id,
            secret_access_key,
        } => {
            let retry = RetryConfig {
                backoff: BackoffConfig::default(),
                max_retries: 3,
                retry_timeout: RETRY_WINDOW,
            };
            let options = ClientOptions::new()
                .with_timeout(REQUEST_TIMEOUT)
                .with_connect_timeout(std::time::Duration::from_secs(3));
            // Client options first: `with_allow_http` below sets one of
            // them, and a later `with_client_options` would undo it.
            let mut builder = AmazonS3Builder::new()
                .with_client_options(options)
                .with_bucket_name(bucket)
                .with_region(region)
                .with_access_key_id(access_key_id)
                .with_secret_access_key(secret_access_key)
                .with_retry(retry);
            if let Some(url) = endpoint {
                let plain = url.starts_with("http://");
                builder = builder
                    .with_endpoint(url)
                    .with_allow_http(plain)
                    .with_virtual_hosted_style_request(false);
            }
            let store = builder
                .build()
                .map_err(|e| BlobError::Config(e.to_string()))?;
            let name = match endpoint {
                Some(url) => format!("s3 {bucket} at {url}"),
                None => format!("s3 {bucket}"),
            };
            Ok((Arc::new(store), name))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_kinds_parse_and_unknown_fields_are_refused() {
        let local: BlobConfig =
            toml::from_str("kind = \"local\"\npath = \"/x\"").expect("local");
        assert_eq!(local, BlobConfig::Local { path: "/x".into() });
        let s3: BlobConfig = toml::from_str(
            "kind = \"s3\"\nbucket = \"b\"\naccess_key_id = \"a\"\n\
             secret_access_key = \"s\"",
        )
        .expect("s3");
        assert!(
            matches!(s3, BlobConfig::S3 { ref region, .. } if region == "us-east-1")
        );
        let bad = toml::from_str::<BlobConfig>(
            "kind = \"local\"\npath = \"/x\"\nbucket = \"b\"",
        );
        assert!(bad.is_err());
    }
}
