//! The mesh CA: a self-signed root generated on first start, or plug-in CA files in the
//! layout Istio uses (`ca-cert.pem`, `ca-key.pem`, `root-cert.pem`, `cert-chain.pem`), so
//! several clusters or nodes can share one root.

use std::fs;
use std::io::Write as _;
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use rustls::pki_types::CertificateDer;

use super::{Error, Identity};

/// Validity of a generated root: long, because rotating a root means re-issuing every
/// workload certificate of every node that trusts it.
const ROOT_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// Workload certificates are back-dated by this much to tolerate clock skew between nodes.
const CLOCK_SKEW: Duration = Duration::from_secs(5 * 60);

/// File names of a plug-in CA directory (Istio's `cacerts` secret layout).
#[derive(Debug, Clone)]
pub struct CaFiles {
    /// The signing certificate.
    pub ca_cert: PathBuf,
    /// Its private key (0600).
    pub ca_key: PathBuf,
    /// The root every workload trusts.
    pub root_cert: PathBuf,
    /// The chain from `ca_cert` up to the root, appended to workload certificates.
    pub cert_chain: PathBuf,
}

impl CaFiles {
    /// The standard names inside `dir`.
    pub fn in_dir(dir: &Path) -> Self {
        Self {
            ca_cert: dir.join("ca-cert.pem"),
            ca_key: dir.join("ca-key.pem"),
            root_cert: dir.join("root-cert.pem"),
            cert_chain: dir.join("cert-chain.pem"),
        }
    }
}

/// The CA that signs this node's workload certificates.
pub struct MeshCa {
    issuer: Issuer<'static, KeyPair>,
    roots: Vec<CertificateDer<'static>>,
    /// Intermediates between a leaf and the root, in order.
    chain: Vec<CertificateDer<'static>>,
    /// The signing certificate.
    ca_der: CertificateDer<'static>,
}

impl std::fmt::Debug for MeshCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print key material.
        f.debug_struct("MeshCa").field("roots", &self.roots.len()).field("chain", &self.chain.len()).finish()
    }
}

impl MeshCa {
    /// Loads the CA from `dir`, creating a self-signed root there first if the directory
    /// holds no CA yet.
    pub fn load_or_create(dir: &Path, trust_domain: &str) -> Result<Self, Error> {
        let files = CaFiles::in_dir(dir);
        match (files.ca_cert.exists(), files.ca_key.exists()) {
            (true, true) => Self::load(&files),
            (false, false) => {
                create_dir_private(dir)?;
                Self::generate(&files, trust_domain)?;
                Self::load(&files)
            }
            (true, false) => Err(Error::CaInvalid {
                path: files.ca_key,
                reason: "missing while ca-cert.pem exists; provide both or neither".into(),
            }),
            (false, true) => Err(Error::CaInvalid {
                path: files.ca_cert,
                reason: "missing while ca-key.pem exists; provide both or neither".into(),
            }),
        }
    }

    /// Loads plug-in CA files.
    pub fn load(files: &CaFiles) -> Result<Self, Error> {
        check_key_permissions(&files.ca_key)?;
        let ca_pem = read(&files.ca_cert)?;
        let key = KeyPair::from_pem(&read(&files.ca_key)?)
            .map_err(|e| Error::CaInvalid { path: files.ca_key.clone(), reason: e.to_string() })?;
        let ca_der = single_cert(&files.ca_cert, &ca_pem)?;
        let issuer = Issuer::from_ca_cert_der(&ca_der, key)
            .map_err(|e| Error::CaInvalid { path: files.ca_cert.clone(), reason: e.to_string() })?;
        let roots = if files.root_cert.exists() {
            certs(&files.root_cert, &read(&files.root_cert)?)?
        } else {
            vec![ca_der.clone()]
        };
        let chain = if files.cert_chain.exists() {
            certs(&files.cert_chain, &read(&files.cert_chain)?)?
        } else {
            vec![ca_der.clone()]
        };
        // The root is what peers trust; sending it in the chain is wasted bytes.
        let chain = chain.into_iter().filter(|c| !roots.contains(c)).collect();
        Ok(Self { issuer, roots, chain, ca_der })
    }

    fn generate(files: &CaFiles, trust_domain: &str) -> Result<(), Error> {
        let root = SelfSignedRoot::generate(trust_domain)?;
        write_file(&files.ca_key, root.key_pem.as_bytes(), 0o600)?;
        write_file(&files.ca_cert, root.cert_pem.as_bytes(), 0o644)?;
        write_file(&files.root_cert, root.cert_pem.as_bytes(), 0o644)?;
        write_file(&files.cert_chain, root.cert_pem.as_bytes(), 0o644)?;
        tracing::info!(dir = %files.ca_cert.parent().unwrap_or(Path::new(".")).display(), "generated a new mesh root CA");
        Ok(())
    }

    /// The roots every workload trusts.
    pub fn roots(&self) -> &[CertificateDer<'static>] {
        &self.roots
    }

    /// Issues a certificate for `identity`, valid for `ttl`, with a key made here;
    /// returns the chain (leaf first) and the PKCS#8 private key. For tests and
    /// benchmarks: the mesh's agents never hold the signing key (see
    /// [`MeshCa::issue_for_csr`]).
    pub fn issue(
        &self,
        identity: &Identity,
        ttl: Duration,
    ) -> Result<(Vec<CertificateDer<'static>>, Vec<u8>, SystemTime), Error> {
        let what = || identity.to_string();
        let key = KeyPair::generate().map_err(|source| Error::Generate { what: what(), source })?;
        let (chain, not_after) = self.sign(identity, &key, ttl)?;
        Ok((chain, key.serialize_der(), not_after))
    }

    /// Issues a certificate for `identity`, valid for `ttl`, to the key of the CSR
    /// `csr_pem` (whose signature proves the requester holds it). Whatever names the
    /// CSR asks for are ignored: the certificate names `identity` alone.
    pub fn issue_for_csr(
        &self,
        identity: &Identity,
        csr_pem: &str,
        ttl: Duration,
    ) -> Result<(Vec<CertificateDer<'static>>, SystemTime), Error> {
        let csr = rcgen::CertificateSigningRequestParams::from_pem(csr_pem)
            .map_err(|e| Error::Ca(format!("the CSR is not valid: {e}")))?;
        self.sign(identity, &csr.public_key, ttl)
    }

    fn sign(
        &self,
        identity: &Identity,
        key: &impl rcgen::PublicKeyData,
        ttl: Duration,
    ) -> Result<(Vec<CertificateDer<'static>>, SystemTime), Error> {
        let what = || identity.to_string();
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        let uri = identity.to_string().try_into().map_err(|source| Error::Generate { what: what(), source })?;
        params.subject_alt_names = vec![SanType::URI(uri)];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        params.use_authority_key_identifier_extension = true;
        let now = SystemTime::now();
        let not_after = now + ttl;
        params.not_before = (now - CLOCK_SKEW).into();
        params.not_after = not_after.into();
        let cert = params.signed_by(key, &self.issuer).map_err(|source| Error::Generate { what: what(), source })?;
        let mut chain = vec![cert.der().clone()];
        chain.extend(self.chain.iter().cloned());
        Ok((chain, not_after))
    }

    /// A TLS server certificate for the CA service itself (DNS `names`, `ips`), valid
    /// for `ttl`: its chain and PKCS#8 key.
    pub fn issue_server(
        &self,
        names: &[String],
        ips: &[std::net::IpAddr],
        ttl: Duration,
    ) -> Result<(Vec<CertificateDer<'static>>, Vec<u8>), Error> {
        let what = || format!("CA service certificate for {}", names.join(", "));
        let key = KeyPair::generate().map_err(|source| Error::Generate { what: what(), source })?;
        let mut params =
            CertificateParams::new(names.to_vec()).map_err(|source| Error::Generate { what: what(), source })?;
        params.subject_alt_names.extend(ips.iter().map(|ip| SanType::IpAddress(*ip)));
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        let now = SystemTime::now();
        params.not_before = (now - CLOCK_SKEW).into();
        params.not_after = (now + ttl).into();
        let cert = params.signed_by(&key, &self.issuer).map_err(|source| Error::Generate { what: what(), source })?;
        let mut chain = vec![cert.der().clone()];
        chain.extend(self.chain.iter().cloned());
        Ok((chain, key.serialize_der()))
    }

    /// SHA-256 (hex) of the signing certificate: it changes when the CA is rotated.
    pub fn issuer_digest(&self) -> String {
        ring::digest::digest(&ring::digest::SHA256, &self.ca_der).as_ref().iter().map(|b| format!("{b:02x}")).collect()
    }
}

fn read(path: &Path) -> Result<String, Error> {
    fs::read_to_string(path).map_err(|source| Error::CaFile { path: path.to_owned(), source })
}

fn certs(path: &Path, pem: &str) -> Result<Vec<CertificateDer<'static>>, Error> {
    let certs: Vec<_> = rustls_pemfile::certs(&mut pem.as_bytes())
        .collect::<Result<_, _>>()
        .map_err(|e| Error::CaInvalid { path: path.to_owned(), reason: e.to_string() })?;
    if certs.is_empty() {
        return Err(Error::CaInvalid { path: path.to_owned(), reason: "no PEM certificate found".into() });
    }
    Ok(certs)
}

fn single_cert(path: &Path, pem: &str) -> Result<CertificateDer<'static>, Error> {
    let mut all = certs(path, pem)?;
    Ok(all.swap_remove(0))
}

/// A private key readable by others is refused: it would let any local user mint
/// identities.
fn check_key_permissions(path: &Path) -> Result<(), Error> {
    let meta = fs::metadata(path).map_err(|source| Error::CaFile { path: path.to_owned(), source })?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(Error::CaInvalid {
            path: path.to_owned(),
            reason: format!("mode {mode:o} gives access to group/others; run chmod 600"),
        });
    }
    Ok(())
}

/// Keys a CA Secret must have (Istio's `cacerts` layout); `root-cert.pem` and
/// `cert-chain.pem` are optional.
pub const SECRET_REQUIRED_KEYS: [&str; 2] = ["ca-cert.pem", "ca-key.pem"];

/// A new self-signed mesh root, in PEM: what the agent creates in an empty CA
/// directory and `meshctl install` puts in the `cacerts` Secret when there is none.
pub struct SelfSignedRoot {
    /// The root certificate (also the issuing CA, the chain and the trust anchor).
    pub cert_pem: String,
    /// Its private key (PKCS#8).
    pub key_pem: String,
}

impl std::fmt::Debug for SelfSignedRoot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print key material.
        f.debug_struct("SelfSignedRoot").finish_non_exhaustive()
    }
}

impl SelfSignedRoot {
    /// Generates a root for `trust_domain` (ECDSA P-256, 10 years).
    pub fn generate(trust_domain: &str) -> Result<Self, Error> {
        let what = || format!("mesh root CA for {trust_domain}");
        let key = KeyPair::generate().map_err(|source| Error::Generate { what: what(), source })?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, trust_domain);
        dn.push(DnType::CommonName, "mesh root CA");
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages =
            vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        let now = SystemTime::now();
        params.not_before = (now - CLOCK_SKEW).into();
        params.not_after = (now + ROOT_VALIDITY).into();
        let cert = params.self_signed(&key).map_err(|source| Error::Generate { what: what(), source })?;
        Ok(Self { cert_pem: cert.pem(), key_pem: key.serialize_pem() })
    }

    /// The root as a `cacerts` Secret's data (Istio's plug-in CA layout: the root is
    /// also the issuer and the whole chain).
    pub fn secret_data(&self) -> std::collections::BTreeMap<String, Vec<u8>> {
        [
            ("ca-cert.pem", &self.cert_pem),
            ("ca-key.pem", &self.key_pem),
            ("root-cert.pem", &self.cert_pem),
            ("cert-chain.pem", &self.cert_pem),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.clone().into_bytes()))
        .collect()
    }
}

impl CaFiles {
    /// Writes a plug-in CA delivered as a Secret's data (keys `ca-cert.pem`,
    /// `ca-key.pem`, `root-cert.pem`, `cert-chain.pem`, as Istio's `cacerts` Secret has
    /// them) into `dir`, the key 0600 and the directory 0700. `ca-cert.pem` and
    /// `ca-key.pem` are required; the other two default as for files.
    pub fn write_from_secret(dir: &Path, data: &std::collections::BTreeMap<String, Vec<u8>>) -> Result<Self, Error> {
        let files = Self::in_dir(dir);
        for required in SECRET_REQUIRED_KEYS {
            if !data.contains_key(required) {
                return Err(Error::CaInvalid {
                    path: dir.join(required),
                    reason: format!("the CA Secret has no {required} key (expected Istio's cacerts layout)"),
                });
            }
        }
        create_dir_private(dir)?;
        for (name, path, mode) in [
            ("ca-cert.pem", &files.ca_cert, 0o644),
            ("ca-key.pem", &files.ca_key, 0o600),
            ("root-cert.pem", &files.root_cert, 0o644),
            ("cert-chain.pem", &files.cert_chain, 0o644),
        ] {
            if let Some(bytes) = data.get(name) {
                write_file(path, bytes, mode)?;
            }
        }
        Ok(files)
    }
}

fn create_dir_private(dir: &Path) -> Result<(), Error> {
    fs::create_dir_all(dir).map_err(|source| Error::CaFile { path: dir.to_owned(), source })?;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
        .map_err(|source| Error::CaFile { path: dir.to_owned(), source })
}

/// Writes through a temporary file and a rename, so a crash never leaves half a key.
fn write_file(path: &Path, data: &[u8], mode: u32) -> Result<(), Error> {
    let tmp = path.with_extension("tmp");
    let io = |source| Error::CaFile { path: path.to_owned(), source };
    let mut f = fs::OpenOptions::new().write(true).create(true).truncate(true).mode(mode).open(&tmp).map_err(io)?;
    f.write_all(data).map_err(io)?;
    f.sync_all().map_err(io)?;
    fs::rename(&tmp, path).map_err(io)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_root_is_private_and_reloads() {
        let dir = tempfile::tempdir().unwrap();
        let ca = MeshCa::load_or_create(dir.path(), "cluster.local").unwrap();
        let mode = fs::metadata(dir.path().join("ca-key.pem")).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let again = MeshCa::load_or_create(dir.path(), "cluster.local").unwrap();
        assert_eq!(ca.roots(), again.roots(), "second start must reuse the root");
    }

    #[test]
    fn world_readable_key_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        MeshCa::load_or_create(dir.path(), "cluster.local").unwrap();
        let key = dir.path().join("ca-key.pem");
        fs::set_permissions(&key, fs::Permissions::from_mode(0o644)).unwrap();
        let err = MeshCa::load_or_create(dir.path(), "cluster.local").unwrap_err();
        assert!(err.to_string().contains("chmod 600"), "{err}");
    }

    #[test]
    fn a_ca_secret_becomes_private_plugin_files() {
        let source = tempfile::tempdir().unwrap();
        MeshCa::load_or_create(source.path(), "cluster.local").unwrap();
        let data: std::collections::BTreeMap<String, Vec<u8>> = ["ca-cert.pem", "ca-key.pem"]
            .iter()
            .map(|n| (n.to_string(), fs::read(source.path().join(n)).unwrap()))
            .collect();
        let dir = tempfile::tempdir().unwrap();
        let files = CaFiles::write_from_secret(&dir.path().join("ca"), &data).unwrap();
        assert_eq!(fs::metadata(&files.ca_key).unwrap().permissions().mode() & 0o777, 0o600);
        assert!(MeshCa::load(&files).is_ok());
        let mut missing = data.clone();
        missing.remove("ca-key.pem");
        let e = CaFiles::write_from_secret(&dir.path().join("x"), &missing).unwrap_err().to_string();
        assert!(e.contains("no ca-key.pem key"), "{e}");
    }

    #[test]
    fn half_a_plugin_ca_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("ca-cert.pem"), "x").unwrap();
        let err = MeshCa::load_or_create(dir.path(), "cluster.local").unwrap_err();
        assert!(err.to_string().contains("ca-key.pem"), "{err}");
    }
}
