//! Where the control-plane binaries built by `testenv/build` are.

use std::path::{Path, PathBuf};

use anyhow::{Result, bail};

/// `testenv/versions.env`, shared with `testenv/build` so both agree on versions and paths.
const VERSIONS_ENV: &str = include_str!("../versions.env");

/// The pinned versions of the control plane.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Versions {
    /// kube-apiserver (and kubectl, when built), e.g. `v1.37.2`.
    pub kubernetes: String,
    /// etcd, e.g. `v3.7.3`.
    pub etcd: String,
    /// helm, e.g. `v3.22.0`.
    pub helm: String,
}

impl Versions {
    /// The versions pinned in `testenv/versions.env`.
    pub fn pinned() -> Self {
        let get = |key: &str| {
            VERSIONS_ENV
                .lines()
                .filter_map(|l| l.trim().strip_prefix(key)?.strip_prefix('='))
                .map(|v| v.trim().to_string())
                .next()
                .unwrap_or_else(|| panic!("testenv/versions.env has no {key}"))
        };
        Self {
            kubernetes: get("K8S_VERSION"),
            etcd: get("ETCD_VERSION"),
            helm: get("HELM_VERSION"),
        }
    }
}

/// Paths of the binaries a control plane needs, plus kubectl and helm for tests.
#[derive(Clone, Debug)]
pub struct Binaries {
    /// The directory they were found in.
    pub dir: PathBuf,
    /// `kube-apiserver`.
    pub kube_apiserver: PathBuf,
    /// `etcd`.
    pub etcd: PathBuf,
    /// `kubectl`.
    pub kubectl: PathBuf,
    /// `helm`.
    pub helm: PathBuf,
}

impl Binaries {
    /// The directory `testenv/build` links every binary into, given the cache root.
    pub fn default_dir(cache: &Path) -> PathBuf {
        let v = Versions::pinned();
        cache.join("bin").join(format!(
            "k8s-{}-etcd-{}-helm-{}",
            v.kubernetes, v.etcd, v.helm
        ))
    }

    /// Finds the binaries: in `$STREAMGATE_K8S_BIN` if set, else where `testenv/build` puts them
    /// under `${STREAMGATE_CACHE:-$HOME/.cache/streamgate}`.
    pub fn locate() -> Result<Self> {
        if let Some(dir) = std::env::var_os("STREAMGATE_K8S_BIN").filter(|d| !d.is_empty()) {
            return Self::in_dir(Path::new(&dir)).map_err(|e| {
                e.context("looking in $STREAMGATE_K8S_BIN (unset it to use the default cache)")
            });
        }
        let cache = match std::env::var_os("STREAMGATE_CACHE").filter(|d| !d.is_empty()) {
            Some(c) => PathBuf::from(c),
            None => match std::env::var_os("HOME").filter(|d| !d.is_empty()) {
                Some(home) => PathBuf::from(home).join(".cache").join("streamgate"),
                None => bail!(
                    "neither STREAMGATE_K8S_BIN, STREAMGATE_CACHE nor HOME is set: cannot find the \
                     control-plane binaries; run testenv/build and export what it prints"
                ),
            },
        };
        Self::in_dir(&Self::default_dir(&cache))
    }

    /// The binaries in `dir`; an error naming what is missing and how to build it otherwise.
    pub fn in_dir(dir: &Path) -> Result<Self> {
        let v = Versions::pinned();
        let bins = Self {
            dir: dir.to_path_buf(),
            kube_apiserver: dir.join("kube-apiserver"),
            etcd: dir.join("etcd"),
            kubectl: dir.join("kubectl"),
            helm: dir.join("helm"),
        };
        let missing: Vec<&str> = [
            ("kube-apiserver", &bins.kube_apiserver),
            ("etcd", &bins.etcd),
            ("kubectl", &bins.kubectl),
            ("helm", &bins.helm),
        ]
        .into_iter()
        .filter(|(_, p)| !is_executable(p))
        .map(|(name, _)| name)
        .collect();
        if !missing.is_empty() {
            bail!(
                "the test control plane's binaries are missing: no executable {} in {}. \
                 Run `testenv/build` from the repository root (it builds kube-apiserver {}, etcd {} \
                 and helm {} from Go modules into the cache; the first build takes several \
                 minutes), or set STREAMGATE_K8S_BIN to a directory holding them",
                missing.join(", "),
                dir.display(),
                v.kubernetes,
                v.etcd,
                v.helm,
            );
        }
        Ok(bins)
    }
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    // metadata() follows the links testenv/build makes, so a dangling link counts as missing.
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_are_read_from_versions_env() {
        let v = Versions::pinned();
        assert_eq!(v.kubernetes, "v1.37.2");
        assert!(v.etcd.starts_with("v3.7."), "{}", v.etcd);
        assert_eq!(v.helm, "v3.22.0");
    }

    #[test]
    fn missing_binaries_say_how_to_build_them() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("etcd"), "not executable").unwrap();
        let err = Binaries::in_dir(dir.path()).unwrap_err().to_string();
        assert!(err.contains("testenv/build"), "{err}");
        assert!(err.contains("kube-apiserver, etcd, kubectl, helm"), "{err}");
        assert!(err.contains(&dir.path().display().to_string()), "{err}");
    }
}
