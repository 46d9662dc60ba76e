//! The cell -> edge registration (`POST /internal/cells/register`).
//!
//! A cell announces itself when it starts and again every few seconds
//! (the edge treats a cell it has not heard from lately as gone for new
//! creates). The body is authenticated with the cell's shared secret
//! as `Authorization: Bearer <secret>`.

use serde::{Deserialize, Serialize};

use crate::internal::Accel;

/// Path of the registration route on the edge.
pub const REGISTER_PATH: &str = "/internal/cells/register";

/// What a cell says about itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CellRegistration {
    /// Cell id, e.g. `aws-use1-01`: the audience of its tokens.
    pub id: String,
    /// Cloud provider, e.g. `aws`, `local`.
    pub provider: String,
    /// Region within the provider, e.g. `us-east-1`.
    pub region: String,
    /// Base URL clients reach the cell at (`connectURL`).
    pub url: String,
    /// True while the cell takes no new sandboxes.
    #[serde(default)]
    pub draining: bool,
    /// The workers and their free room, as the cell sees them now.
    #[serde(default)]
    pub workers: Vec<WorkerRoom>,
}

/// One worker of a registering cell.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WorkerRoom {
    /// Worker id, unique in the cell.
    pub worker_id: String,
    /// CPU architecture (`amd64`, `arm64`).
    pub arch: String,
    /// How it runs guests.
    pub accel: Accel,
    /// vCPUs not promised to a VM.
    pub cpus_free: u32,
    /// vCPUs in all.
    pub cpus_total: u32,
    /// Memory not promised, MiB.
    #[serde(rename = "memoryFreeMB")]
    pub memory_free_mb: u64,
    /// Memory in all, MiB.
    #[serde(rename = "memoryTotalMB")]
    pub memory_total_mb: u64,
    /// Disk not promised, MiB.
    #[serde(rename = "diskFreeMB")]
    pub disk_free_mb: u64,
    /// Disk in all, MiB.
    #[serde(rename = "diskTotalMB")]
    pub disk_total_mb: u64,
    /// True while it takes no new VMs (drained or unhealthy).
    #[serde(default)]
    pub draining: bool,
    /// Templates it can start.
    #[serde(default)]
    pub templates: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registration_round_trips_and_refuses_unknown_fields() {
        let reg = CellRegistration {
            id: "aws-use1-01".into(),
            provider: "aws".into(),
            region: "us-east-1".into(),
            url: "https://use1.example".into(),
            draining: false,
            workers: vec![WorkerRoom {
                worker_id: "w1".into(),
                arch: "amd64".into(),
                accel: Accel::Kvm,
                cpus_free: 3,
                cpus_total: 4,
                memory_free_mb: 1024,
                memory_total_mb: 4096,
                disk_free_mb: 10,
                disk_total_mb: 20,
                draining: false,
                templates: vec!["base".into()],
            }],
        };
        let json = serde_json::to_value(&reg).expect("json");
        assert_eq!(json["workers"][0]["memoryFreeMB"], 1024);
        let back: CellRegistration =
            serde_json::from_value(json.clone()).expect("back");
        assert_eq!(back, reg);
        let mut bad = json;
        bad["gpu"] = true.into();
        assert!(serde_json::from_value::<CellRegistration>(bad).is_err());
    }
}
