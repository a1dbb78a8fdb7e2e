//! Test identity tokens: key pairs with their JWKS, and signed JWTs, for trying a
//! ViewerAuthentication without an identity provider (`streamctl token`). Tests use the same
//! functions to sign real tokens.

use std::fmt;
use std::str::FromStr;

use anyhow::{Context, Result, anyhow, bail};
use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use ring::rand::SystemRandom;
use ring::signature::{self, KeyPair};
use rsa::pkcs8::{DecodePrivateKey, EncodePrivateKey};
use rsa::traits::PublicKeyParts;
use serde_json::{Value, json};

/// The algorithms test keys can be made for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyAlg {
    /// RSA 2048, RS256.
    Rs256,
    /// ECDSA P-256, ES256.
    Es256,
    /// Ed25519, EdDSA.
    EdDsa,
}

impl KeyAlg {
    /// The JWT `alg`.
    pub fn as_str(self) -> &'static str {
        match self {
            KeyAlg::Rs256 => "RS256",
            KeyAlg::Es256 => "ES256",
            KeyAlg::EdDsa => "EdDSA",
        }
    }

    fn jwt(self) -> Algorithm {
        match self {
            KeyAlg::Rs256 => Algorithm::RS256,
            KeyAlg::Es256 => Algorithm::ES256,
            KeyAlg::EdDsa => Algorithm::EdDSA,
        }
    }
}

impl fmt::Display for KeyAlg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for KeyAlg {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "RS256" => Ok(KeyAlg::Rs256),
            "ES256" => Ok(KeyAlg::Es256),
            "EdDSA" => Ok(KeyAlg::EdDsa),
            other => Err(format!("must be RS256, ES256 or EdDSA, got {other:?}")),
        }
    }
}

/// A signing key pair: the private key (PKCS#8 DER) and its public JWK.
#[derive(Clone)]
pub struct TestKey {
    /// Algorithm.
    pub alg: KeyAlg,
    /// Key id, in the JWK and in token headers.
    pub kid: String,
    pkcs8: Vec<u8>,
    /// The public key as a JWK (with `kid`, `alg` and `use`).
    pub jwk: Value,
}

impl fmt::Debug for TestKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TestKey({} {})", self.alg, self.kid)
    }
}

fn b64(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

impl TestKey {
    /// Generates a new key pair.
    pub fn generate(alg: KeyAlg, kid: &str) -> Result<Self> {
        let rng = SystemRandom::new();
        let pkcs8 = match alg {
            KeyAlg::Rs256 => {
                let key = rsa::RsaPrivateKey::new(&mut rsa::rand_core::OsRng, 2048)
                    .context("generating an RSA key")?;
                key.to_pkcs8_der()
                    .context("encoding the RSA key")?
                    .as_bytes()
                    .to_vec()
            }
            KeyAlg::Es256 => signature::EcdsaKeyPair::generate_pkcs8(
                &signature::ECDSA_P256_SHA256_FIXED_SIGNING,
                &rng,
            )
            .map_err(|_| anyhow!("generating a P-256 key failed"))?
            .as_ref()
            .to_vec(),
            KeyAlg::EdDsa => signature::Ed25519KeyPair::generate_pkcs8(&rng)
                .map_err(|_| anyhow!("generating an Ed25519 key failed"))?
                .as_ref()
                .to_vec(),
        };
        Self::from_pkcs8(alg, kid, pkcs8)
    }

    /// A key from its PKCS#8 DER.
    pub fn from_pkcs8(alg: KeyAlg, kid: &str, pkcs8: Vec<u8>) -> Result<Self> {
        let mut jwk = match alg {
            KeyAlg::Rs256 => {
                let key = rsa::RsaPrivateKey::from_pkcs8_der(&pkcs8)
                    .context("the key is not an RSA private key (PKCS#8)")?;
                json!({"kty": "RSA", "n": b64(&key.n().to_bytes_be()), "e": b64(&key.e().to_bytes_be())})
            }
            KeyAlg::Es256 => {
                let pair = signature::EcdsaKeyPair::from_pkcs8(
                    &signature::ECDSA_P256_SHA256_FIXED_SIGNING,
                    &pkcs8,
                    &SystemRandom::new(),
                )
                .map_err(|e| anyhow!("the key is not a P-256 private key (PKCS#8): {e}"))?;
                // Uncompressed point: 0x04, x (32 bytes), y (32 bytes).
                let point = pair.public_key().as_ref();
                json!({"kty": "EC", "crv": "P-256", "x": b64(&point[1..33]), "y": b64(&point[33..65])})
            }
            KeyAlg::EdDsa => {
                let pair = signature::Ed25519KeyPair::from_pkcs8_maybe_unchecked(&pkcs8)
                    .map_err(|e| anyhow!("the key is not an Ed25519 private key (PKCS#8): {e}"))?;
                json!({"kty": "OKP", "crv": "Ed25519", "x": b64(pair.public_key().as_ref())})
            }
        };
        jwk["kid"] = json!(kid);
        jwk["alg"] = json!(alg.as_str());
        jwk["use"] = json!("sig");
        Ok(Self {
            alg,
            kid: kid.to_string(),
            pkcs8,
            jwk,
        })
    }

    /// The private key as PEM (`PRIVATE KEY`, PKCS#8).
    pub fn private_pem(&self) -> String {
        let body = STANDARD.encode(&self.pkcs8);
        let lines: Vec<&str> = body
            .as_bytes()
            .chunks(64)
            .map(|c| std::str::from_utf8(c).expect("base64 is ASCII"))
            .collect();
        format!(
            "-----BEGIN PRIVATE KEY-----\n{}\n-----END PRIVATE KEY-----\n",
            lines.join("\n")
        )
    }

    /// A key from a PEM file's text.
    pub fn from_pem(alg: KeyAlg, kid: &str, pem: &str) -> Result<Self> {
        let body: String = pem
            .lines()
            .filter(|l| !l.starts_with("-----"))
            .map(str::trim)
            .collect();
        if !pem.contains("BEGIN PRIVATE KEY") {
            bail!(
                "expected a PKCS#8 PEM private key (BEGIN PRIVATE KEY), as `streamctl token keygen` writes"
            );
        }
        let der = STANDARD
            .decode(body)
            .context("the PEM body is not base64")?;
        Self::from_pkcs8(alg, kid, der)
    }

    /// Signs `claims` into a JWT whose header names this key's `alg` and `kid`.
    pub fn sign(&self, claims: &Value) -> Result<String> {
        let key = match self.alg {
            KeyAlg::Rs256 => EncodingKey::from_rsa_der(
                rsa::RsaPrivateKey::from_pkcs8_der(&self.pkcs8)
                    .and_then(|k| {
                        use rsa::pkcs1::EncodeRsaPrivateKey;
                        k.to_pkcs1_der().map_err(Into::into)
                    })
                    .context("re-encoding the RSA key")?
                    .as_bytes(),
            ),
            KeyAlg::Es256 => EncodingKey::from_ec_der(&self.pkcs8),
            KeyAlg::EdDsa => EncodingKey::from_ed_der(&self.pkcs8),
        };
        let mut header = Header::new(self.alg.jwt());
        header.kid = Some(self.kid.clone());
        jsonwebtoken::encode(&header, claims, &key).context("signing the token")
    }
}

/// A JWKS of these keys' public halves.
pub fn jwks(keys: &[&TestKey]) -> String {
    json!({"keys": keys.iter().map(|k| k.jwk.clone()).collect::<Vec<_>>()}).to_string()
}

/// Claims of a test token: `iss`, `sub`, `aud` (when given), `iat`, `exp` = now + `ttl_seconds`,
/// plus `extra` (`name=value`; a value that parses as JSON is taken as JSON, e.g. `climit=2`).
pub fn claims(
    issuer: &str,
    subject: &str,
    audience: Option<&str>,
    ttl_seconds: i64,
    extra: &[String],
) -> Result<Value> {
    let now = chrono::Utc::now().timestamp();
    let mut claims = json!({"iss": issuer, "sub": subject, "iat": now, "exp": now + ttl_seconds});
    if let Some(aud) = audience {
        claims["aud"] = json!(aud);
    }
    for pair in extra {
        let (name, value) = pair
            .split_once('=')
            .ok_or_else(|| anyhow!("--claim {pair:?}: expected NAME=VALUE"))?;
        claims[name] = serde_json::from_str(value).unwrap_or_else(|_| json!(value));
    }
    Ok(claims)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip_through_pem_and_sign() {
        for alg in [KeyAlg::Es256, KeyAlg::EdDsa, KeyAlg::Rs256] {
            let key = TestKey::generate(alg, "k1").unwrap();
            let again = TestKey::from_pem(alg, "k1", &key.private_pem()).unwrap();
            assert_eq!(key.jwk, again.jwk, "{alg}");
            let token = again
                .sign(&claims("https://id.test", "alice", None, 60, &[]).unwrap())
                .unwrap();
            assert_eq!(token.split('.').count(), 3);
            let header = jsonwebtoken::decode_header(&token).unwrap();
            assert_eq!(header.kid.as_deref(), Some("k1"));
            // The JWK verifies the signature.
            let jwk: jsonwebtoken::jwk::Jwk = serde_json::from_value(key.jwk.clone()).unwrap();
            let mut validation = jsonwebtoken::Validation::new(alg.jwt());
            validation.validate_aud = false;
            jsonwebtoken::decode::<Value>(
                &token,
                &jsonwebtoken::DecodingKey::from_jwk(&jwk).unwrap(),
                &validation,
            )
            .unwrap();
        }
    }

    #[test]
    fn extra_claims_are_json_when_they_parse() {
        let c = claims(
            "i",
            "s",
            Some("a"),
            60,
            &["climit=2".into(), "tier=gold".into()],
        )
        .unwrap();
        assert_eq!(c["climit"], json!(2));
        assert_eq!(c["tier"], json!("gold"));
        assert!(claims("i", "s", None, 60, &["bad".into()]).is_err());
    }
}
