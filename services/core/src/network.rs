//! The network configuration: the channel, the organisations and their members' public keys, the
//! orderers, each contract's endorsement policy, and the orderer's batch settings. Fabric spreads
//! this over configtx.yaml and MSP folders; here it is one TOML file (`network.toml`), with the
//! private keys kept apart in a key store (`keys.toml`) that only their owners should hold.

use std::collections::{BTreeMap, HashMap};

use serde::{Deserialize, Serialize};

use crate::crypto::Signer;
use crate::cutter::BatchConfig;
use crate::model::Identity;
use crate::policy::{Policy, Role};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkConfig {
    pub channel: String,
    pub orgs: Vec<OrgConfig>,
    pub orderers: Vec<OrdererConfig>,
    pub contracts: Vec<ContractConfig>,
    #[serde(default)]
    pub batch: BatchConfig,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OrgConfig {
    /// The org's name, Fabric's MSP id: what policies name (`'Org1.peer'`).
    pub name: String,
    pub members: Vec<MemberConfig>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemberConfig {
    /// Unique within the org, e.g. `peer0` or `client0`.
    pub name: String,
    pub role: Role,
    /// Hex Ed25519 public key.
    pub public_key: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OrdererConfig {
    pub id: String,
    /// Hex Ed25519 public key the orderer signs blocks with.
    pub public_key: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ContractConfig {
    pub name: String,
    /// Fabric policy text, e.g. `AND('Org1.peer', 'Org2.peer')`.
    pub policy: String,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("network config: {0}")]
    Toml(String),
    #[error("network config: {field}: {problem}")]
    Invalid { field: String, problem: String },
}

fn invalid(field: impl Into<String>, problem: impl Into<String>) -> ConfigError {
    ConfigError::Invalid { field: field.into(), problem: problem.into() }
}

/// Names become topic names, key-store entries and metric labels: keep them to a safe alphabet.
fn check_name(field: &str, name: &str) -> Result<(), ConfigError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        && !name.starts_with('-');
    if ok {
        Ok(())
    } else {
        Err(invalid(field, format!("{name:?} must be 1 to 64 of A-Z a-z 0-9 - _")))
    }
}

fn parse_key(field: &str, hex_key: &str) -> Result<Vec<u8>, ConfigError> {
    let bytes = hex::decode(hex_key).map_err(|e| invalid(field, format!("not hex: {e}")))?;
    if bytes.len() != 32 {
        return Err(invalid(field, format!("an Ed25519 public key is 32 bytes, got {}", bytes.len())));
    }
    Ok(bytes)
}

/// A validated network configuration, indexed for the lookups every stage makes per transaction.
#[derive(Debug, Clone)]
pub struct Network {
    config: NetworkConfig,
    members: HashMap<(String, Vec<u8>), (Role, String)>,
    orderers: HashMap<String, Vec<u8>>,
    policies: BTreeMap<String, Policy>,
}

impl Network {
    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        let config: NetworkConfig = toml::from_str(text).map_err(|e| ConfigError::Toml(e.to_string()))?;
        Self::new(config)
    }

    /// Checks everything a stage would otherwise trip over later, naming the bad field.
    pub fn new(config: NetworkConfig) -> Result<Self, ConfigError> {
        check_name("channel", &config.channel)?;
        config.batch.validate().map_err(|p| invalid("batch", p))?;
        let mut members = HashMap::new();
        for (i, org) in config.orgs.iter().enumerate() {
            check_name(&format!("orgs[{i}].name"), &org.name)?;
            if config.orgs[..i].iter().any(|o| o.name == org.name) {
                return Err(invalid(format!("orgs[{i}].name"), format!("org {} is listed twice", org.name)));
            }
            for (j, m) in org.members.iter().enumerate() {
                let field = format!("orgs[{i}].members[{j}]");
                check_name(&format!("{field}.name"), &m.name)?;
                let key = parse_key(&format!("{field}.public_key"), &m.public_key)?;
                if members.insert((org.name.clone(), key), (m.role, m.name.clone())).is_some() {
                    return Err(invalid(format!("{field}.public_key"), "the same key is registered twice"));
                }
            }
        }
        let mut orderers = HashMap::new();
        for (i, o) in config.orderers.iter().enumerate() {
            check_name(&format!("orderers[{i}].id"), &o.id)?;
            let key = parse_key(&format!("orderers[{i}].public_key"), &o.public_key)?;
            if orderers.insert(o.id.clone(), key).is_some() {
                return Err(invalid(format!("orderers[{i}].id"), format!("orderer {} is listed twice", o.id)));
            }
        }
        if orderers.is_empty() {
            return Err(invalid("orderers", "at least one orderer is needed"));
        }
        let mut policies = BTreeMap::new();
        for (i, c) in config.contracts.iter().enumerate() {
            check_name(&format!("contracts[{i}].name"), &c.name)?;
            let policy = Policy::parse(&c.policy).map_err(|e| invalid(format!("contracts[{i}].policy"), e.to_string()))?;
            if let Some(unknown) = policy.orgs().into_iter().find(|o| !config.orgs.iter().any(|org| org.name == *o)) {
                return Err(invalid(format!("contracts[{i}].policy"), format!("names org {unknown}, which is not in orgs")));
            }
            if policies.insert(c.name.clone(), policy).is_some() {
                return Err(invalid(format!("contracts[{i}].name"), format!("contract {} is listed twice", c.name)));
            }
        }
        Ok(Self { config, members, orderers, policies })
    }

    pub fn config(&self) -> &NetworkConfig {
        &self.config
    }

    pub fn channel(&self) -> &str {
        &self.config.channel
    }

    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(&self.config).expect("the config is plain data")
    }

    /// The role of a registered identity, or `None` for a key the network does not know.
    pub fn role_of(&self, id: &Identity) -> Option<Role> {
        self.members.get(&(id.org.clone(), id.public_key.clone())).map(|(role, _)| *role)
    }

    /// `Org.member` for a registered identity: how logs and metrics name it.
    pub fn member_name(&self, id: &Identity) -> Option<String> {
        self.members.get(&(id.org.clone(), id.public_key.clone())).map(|(_, name)| format!("{}.{name}", id.org))
    }

    pub fn policy(&self, contract: &str) -> Option<&Policy> {
        self.policies.get(contract)
    }

    pub fn orderer_key(&self, id: &str) -> Option<&[u8]> {
        self.orderers.get(id).map(Vec::as_slice)
    }

    pub fn org_names(&self) -> impl Iterator<Item = &str> {
        self.config.orgs.iter().map(|o| o.name.as_str())
    }
}

/// Private keys by owner (`Org1/peer0`, `orderer/orderer0`), as hex seeds. Written with
/// owner-only permissions by the CLI; each process loads only the entries it signs with.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct KeyStore {
    pub keys: BTreeMap<String, String>,
}

impl KeyStore {
    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        toml::from_str(text).map_err(|e| ConfigError::Toml(format!("key store: {e}")))
    }

    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("the key store is plain data")
    }

    /// The signer of an org member (`owner` = `Org1/peer0`) or an orderer (`orderer/orderer0`).
    pub fn signer(&self, owner: &str) -> Result<Signer, ConfigError> {
        let field = format!("keys.{owner}");
        let hex_seed = self.keys.get(owner).ok_or_else(|| invalid(&field, "no such key in the key store"))?;
        let seed: [u8; 32] = hex::decode(hex_seed)
            .ok()
            .and_then(|b| b.try_into().ok())
            .ok_or_else(|| invalid(&field, "a key is 64 hex digits"))?;
        let org = owner.split('/').next().unwrap_or(owner);
        Ok(Signer::from_seed(org, seed))
    }
}

/// What to generate: org names, members per org, orderer ids, contracts and their policies.
#[derive(Debug, Clone)]
pub struct NetworkSpec {
    pub channel: String,
    pub orgs: Vec<String>,
    pub orderers: Vec<String>,
    pub contracts: Vec<(String, String)>,
}

impl NetworkSpec {
    /// The sample network: two orgs, each with a peer and a client, two orderers, and the three
    /// shipped contracts. `transfer` and `smallbank` need both orgs (2-of-2), `kv` either.
    pub fn sample() -> Self {
        let both = "AND('Org1.peer', 'Org2.peer')".to_string();
        Self {
            channel: "mychannel".into(),
            orgs: vec!["Org1".into(), "Org2".into()],
            orderers: vec!["orderer0".into(), "orderer1".into()],
            contracts: vec![
                ("transfer".into(), both.clone()),
                ("smallbank".into(), both),
                ("kv".into(), "OR('Org1.peer', 'Org2.peer')".into()),
            ],
        }
    }

    /// Builds the configuration and key store. The core draws no randomness: `seed` supplies
    /// each secret (the CLI passes the OS's random source; tests pass a counter).
    pub fn generate(&self, mut seed: impl FnMut() -> [u8; 32]) -> Result<(Network, KeyStore), ConfigError> {
        let mut keys = KeyStore::default();
        let mut new_key = |owner: String| {
            let s = Signer::from_seed("", seed());
            keys.keys.insert(owner, hex::encode(s.seed()));
            hex::encode(&s.identity().public_key)
        };
        let orgs = self
            .orgs
            .iter()
            .map(|org| OrgConfig {
                name: org.clone(),
                members: [("peer0", Role::Peer), ("client0", Role::Client)]
                    .into_iter()
                    .map(|(name, role)| MemberConfig { name: name.into(), role, public_key: new_key(format!("{org}/{name}")) })
                    .collect(),
            })
            .collect();
        let orderers = self
            .orderers
            .iter()
            .map(|id| OrdererConfig { id: id.clone(), public_key: new_key(format!("orderer/{id}")) })
            .collect();
        let config = NetworkConfig {
            channel: self.channel.clone(),
            orgs,
            orderers,
            contracts: self.contracts.iter().map(|(name, policy)| ContractConfig { name: name.clone(), policy: policy.clone() }).collect(),
            batch: BatchConfig::default(),
        };
        Ok((Network::new(config)?, keys))
    }
}

/// Deterministic seeds for tests and examples: never for a real network.
pub fn counter_seeds(start: u8) -> impl FnMut() -> [u8; 32] {
    let mut n = start;
    move || {
        n = n.wrapping_add(1);
        crate::crypto::sha256(&[b's', n])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> (Network, KeyStore) {
        NetworkSpec::sample().generate(counter_seeds(0)).expect("sample network")
    }

    #[test]
    fn sample_network_round_trips_through_toml() {
        let (net, keys) = sample();
        let again = Network::from_toml(&net.to_toml()).unwrap();
        assert_eq!(again.config(), net.config());
        assert_eq!(KeyStore::from_toml(&keys.to_toml()).unwrap(), keys);
        assert_eq!(net.org_names().collect::<Vec<_>>(), ["Org1", "Org2"]);
    }

    #[test]
    fn key_store_signers_are_the_registered_identities() {
        let (net, keys) = sample();
        let peer = keys.signer("Org1/peer0").unwrap();
        assert_eq!(net.role_of(peer.identity()), Some(Role::Peer));
        assert_eq!(net.member_name(peer.identity()).unwrap(), "Org1.peer0");
        let client = keys.signer("Org2/client0").unwrap();
        assert_eq!(net.role_of(client.identity()), Some(Role::Client));
        // The same key claimed by another org is unknown.
        let forged = Identity { org: "Org1".into(), public_key: client.identity().public_key.clone() };
        assert_eq!(net.role_of(&forged), None);
        let orderer = keys.signer("orderer/orderer1").unwrap();
        assert_eq!(net.orderer_key("orderer1"), Some(orderer.identity().public_key.as_slice()));
        assert!(keys.signer("Org3/peer0").unwrap_err().to_string().contains("keys.Org3/peer0"));
    }

    #[test]
    fn bad_configs_name_the_field() {
        let (net, _) = sample();
        type Mutation = Box<dyn Fn(&mut NetworkConfig)>;
        let cases: Vec<(Mutation, &str)> = vec![
            (Box::new(|c| c.channel = "my channel".into()), "channel"),
            (Box::new(|c| c.orgs[1].members[0].public_key = "zz".into()), "orgs[1].members[0].public_key"),
            (Box::new(|c| c.orgs[0].members[1].public_key = "ab".repeat(31)), "32 bytes"),
            (Box::new(|c| c.orgs[1].name = "Org1".into()), "listed twice"),
            (Box::new(|c| c.contracts[0].policy = "AND('Org1.peer', 'Org9.peer')".into()), "names org Org9"),
            (Box::new(|c| c.contracts[2].policy = "AND('Org1.peer'".into()), "contracts[2].policy"),
            (Box::new(|c| c.orderers.clear()), "orderers"),
            (Box::new(|c| c.batch.max_message_count = 0), "batch"),
        ];
        for (mutate, expected) in cases {
            let mut c = net.config().clone();
            mutate(&mut c);
            let err = Network::new(c).unwrap_err().to_string();
            assert!(err.contains(expected), "{err:?} should mention {expected:?}");
        }
        let err = Network::from_toml("channel = 'x'\norgs = []\nfoo = 1").unwrap_err().to_string();
        assert!(err.contains("foo") || err.contains("unknown"), "{err}");
    }
}
