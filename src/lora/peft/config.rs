//! `adapter_config.json` parsing and LoRA's plan: parsing (pattern maps kept in file
//! order), `rank_pattern`/`alpha_pattern` and scaling, and the refusal of PEFT features
//! we do not implement. Which modules a config selects is `super::select`'s.
use super::select::ModuleMatch;
use super::AdapterError::{self, Invalid, Unsupported};
use super::{AdapterKind, BaseShape, LoraSite};
use regex::Regex;
use serde::de::{DeserializeSeed, Deserializer, MapAccess, Visitor};
use serde::Deserialize;
use serde_json::Value;
use std::collections::HashMap;
use std::fmt;

/// The config as JSON values, except the pattern maps, whose order matters to PEFT (the
/// first matching key wins) and is kept whatever serde_json's map type does.
pub(super) struct RawConfig {
    fields: HashMap<String, Value>,
    rank_pattern: Vec<(String, Value)>,
    alpha_pattern: Vec<(String, Value)>,
}

impl RawConfig {
    /// A field, with JSON null read as absent (PEFT's `None`).
    pub(super) fn get(&self, key: &str) -> Option<&Value> {
        self.fields.get(key).filter(|v| !v.is_null())
    }
}

impl<'de> Deserialize<'de> for RawConfig {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Top;
        impl<'de> Visitor<'de> for Top {
            type Value = RawConfig;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<RawConfig, A::Error> {
                let mut raw = RawConfig {
                    fields: HashMap::new(),
                    rank_pattern: Vec::new(),
                    alpha_pattern: Vec::new(),
                };
                while let Some(key) = map.next_key::<String>()? {
                    match key.as_str() {
                        "rank_pattern" => raw.rank_pattern = map.next_value_seed(Ordered(&key))?,
                        "alpha_pattern" => {
                            raw.alpha_pattern = map.next_value_seed(Ordered(&key))?
                        }
                        _ => {
                            let value = map.next_value::<Value>()?;
                            raw.fields.insert(key, value);
                        }
                    }
                }
                Ok(raw)
            }
        }
        d.deserialize_map(Top)
    }
}

/// An object (or null) read as its entries in file order; the field name is for errors.
struct Ordered<'a>(&'a str);

impl<'de> DeserializeSeed<'de> for Ordered<'_> {
    type Value = Vec<(String, Value)>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Ordered<'_> {
    type Value = Vec<(String, Value)>;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "{} to be an object or null", self.0)
    }
    fn visit_unit<E>(self) -> Result<Self::Value, E> {
        Ok(Vec::new())
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut entries = Vec::new();
        while let Some(entry) = map.next_entry::<String, Value>()? {
            entries.push(entry);
        }
        Ok(entries)
    }
}

/// Rank and scale of one targeted site.
#[derive(Clone, Copy, Debug)]
pub(super) struct SitePlan {
    pub(super) rank: usize,
    pub(super) scale: f32,
}

pub(super) type Plan = Vec<[Option<SitePlan>; 7]>;

/// The parts of a LoRA config that decide which weights exist and how they scale.
pub(super) struct LoraConfig {
    r: usize,
    alpha: f64,
    use_rslora: bool,
    modules: ModuleMatch,
    rank_pattern: Vec<(Regex, usize)>,
    alpha_pattern: Vec<(Regex, f64)>,
}

/// Fields that change what an adapter computes and that we do not implement, with why.
const REFUSED_FIELDS: [(&str, &str); 13] = [
    (
        "modules_to_save",
        "fully trained extra modules are not supported",
    ),
    ("lora_bias", "LoRA bias terms are not supported"),
    (
        "fan_in_fan_out",
        "Conv1D (fan_in_fan_out) layouts are not supported",
    ),
    ("layer_replication", "layer replication is not supported"),
    ("use_qalora", "QALoRA is not supported"),
    (
        "target_parameters",
        "LoRA on nn.Parameter targets is not supported",
    ),
    (
        "alora_invocation_tokens",
        "activated LoRA (aLoRA) is not supported",
    ),
    (
        "trainable_token_indices",
        "trainable token embeddings are not supported",
    ),
    ("use_bdlora", "block-diagonal LoRA is not supported"),
    ("arrow_config", "Arrow adapter routing is not supported"),
    ("kasa_config", "KaSA is not supported"),
    ("monteclora_config", "MonteCLoRA is not supported"),
    ("velora_config", "VeLoRA is not supported"),
];

/// Set in the Python sense: not null, false, 0, "" or empty.
pub(super) fn is_set(value: &Value) -> bool {
    match value {
        Value::Null => false,
        Value::Bool(b) => *b,
        Value::Number(n) => n.as_f64() != Some(0.0),
        Value::String(s) => !s.is_empty(),
        Value::Array(a) => !a.is_empty(),
        Value::Object(o) => !o.is_empty(),
    }
}

impl RawConfig {
    /// `rank_pattern` as written, in file order (AdaLoRA keeps rank masks there).
    pub(super) fn rank_pattern_entries(&self) -> &[(String, Value)] {
        &self.rank_pattern
    }

    /// `peft_type`, which every config must have.
    pub(super) fn peft_type(&self) -> Result<&str, AdapterError> {
        match self.get("peft_type") {
            None => Err(Invalid("config: missing peft_type".into())),
            Some(Value::String(s)) => Ok(s),
            Some(other) => Err(Invalid(format!(
                "config: peft_type must be a string, not {other}"
            ))),
        }
    }
}

impl LoraConfig {
    /// LoRA, or DoRA when `use_dora` is set.
    pub(super) fn kind(raw: &RawConfig) -> Result<AdapterKind, AdapterError> {
        match raw.get("use_dora") {
            None | Some(Value::Bool(false)) => Ok(AdapterKind::Lora),
            Some(Value::Bool(true)) => Ok(AdapterKind::Dora),
            Some(other) => Err(Invalid(format!(
                "config: use_dora must be a boolean, not {other}"
            ))),
        }
    }

    pub(super) fn parse(raw: &RawConfig) -> Result<LoraConfig, AdapterError> {
        if raw.peft_type()? != "LORA" {
            return Err(Invalid("config: peft_type is not LORA".into()));
        }
        refuse_unsupported(raw)?;
        let r = match raw.get("r") {
            None => return Err(Invalid("config: missing r".into())),
            Some(v) => positive_int("r", v)?,
        };
        let alpha = raw
            .get("lora_alpha")
            .map_or(Ok(8.0), |v| number("lora_alpha", v))?;
        let use_rslora = match raw.get("use_rslora") {
            None => false,
            Some(Value::Bool(b)) => *b,
            Some(other) => {
                return Err(Invalid(format!(
                    "config: use_rslora must be a boolean, not {other}"
                )))
            }
        };
        // PEFT's default for model_type "llama" when target_modules is None.
        let modules = ModuleMatch::parse(raw, &["q_proj", "v_proj"], true)?;
        let rank_pattern = patterns("rank_pattern", &raw.rank_pattern, positive_int)?;
        let alpha_pattern = patterns("alpha_pattern", &raw.alpha_pattern, number)?;
        Ok(LoraConfig {
            r,
            alpha,
            use_rslora,
            modules,
            rank_pattern,
            alpha_pattern,
        })
    }

    /// Which (layer, site) pairs PEFT would wrap, with their rank and scale.
    pub(super) fn plan(&self, base: &BaseShape) -> Result<Plan, AdapterError> {
        let selected = self.modules.selected(base)?;
        Ok(selected
            .iter()
            .enumerate()
            .map(|(layer, sites)| {
                std::array::from_fn(|i| {
                    let site = LoraSite::ALL[i];
                    sites[i].then(|| self.site_plan(&base.module_path(site, layer)))
                })
            })
            .collect())
    }

    /// `get_pattern_key`: the first pattern key (in file order) matching the end of the name
    /// on a dot boundary overrides `r` / `lora_alpha`.
    fn site_plan(&self, path: &str) -> SitePlan {
        let rank = self
            .rank_pattern
            .iter()
            .find(|(re, _)| re.is_match(path))
            .map_or(self.r, |p| p.1);
        let alpha = self
            .alpha_pattern
            .iter()
            .find(|(re, _)| re.is_match(path))
            .map_or(self.alpha, |p| p.1);
        let denominator = if self.use_rslora {
            (rank as f64).sqrt()
        } else {
            rank as f64
        };
        SitePlan {
            rank,
            scale: (alpha / denominator) as f32,
        }
    }
}

pub(super) fn refuse_unsupported(raw: &RawConfig) -> Result<(), AdapterError> {
    for (field, why) in REFUSED_FIELDS {
        if let Some(value) = raw.get(field).filter(|v| is_set(v)) {
            return Err(Unsupported(format!("{field} = {value} ({why})")));
        }
    }
    if let Some(bias) = raw.get("bias").filter(|v| v.as_str() != Some("none")) {
        return Err(Unsupported(format!(
            "bias = {bias} (only \"none\" is supported)"
        )));
    }
    // These initialisations change the base weights too (the adapter is relative to a
    // residual model) unless PEFT converted the adapter to plain LoRA when saving it.
    if let Some(init) = raw.get("init_lora_weights").and_then(Value::as_str) {
        let lower = init.to_lowercase();
        if lower.starts_with("pissa")
            || ["olora", "corda", "loftq", "lora_ga"].contains(&lower.as_str())
        {
            return Err(Unsupported(format!(
                "init_lora_weights = \"{init}\" (needs its modified base model; save it converted to plain LoRA)"
            )));
        }
    }
    Ok(())
}

fn patterns<T>(
    field: &str,
    entries: &[(String, Value)],
    value: fn(&str, &Value) -> Result<T, AdapterError>,
) -> Result<Vec<(Regex, T)>, AdapterError> {
    entries
        .iter()
        .map(|(key, v)| {
            let re = compile(field, key, &format!(r"^(?:.*\.)?(?:{key})$"))?;
            Ok((re, value(&format!("{field}[\"{key}\"]"), v)?))
        })
        .collect()
}

pub(super) fn compile(field: &str, source: &str, pattern: &str) -> Result<Regex, AdapterError> {
    Regex::new(pattern).map_err(|e| {
        Unsupported(format!(
            "config: {field} regex \"{source}\" cannot be evaluated here: {e}"
        ))
    })
}

pub(super) fn positive_int(field: &str, value: &Value) -> Result<usize, AdapterError> {
    match value.as_u64() {
        Some(n) if n > 0 => {
            usize::try_from(n).map_err(|_| Invalid(format!("config: {field} too large")))
        }
        _ => Err(Invalid(format!(
            "config: {field} must be a positive integer, not {value}"
        ))),
    }
}

pub(super) fn number(field: &str, value: &Value) -> Result<f64, AdapterError> {
    value
        .as_f64()
        .filter(|x| x.is_finite())
        .ok_or_else(|| Invalid(format!("config: {field} must be a number, not {value}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(json: &str) -> LoraConfig {
        let raw: RawConfig = serde_json::from_str(json).unwrap();
        LoraConfig::parse(&raw).unwrap()
    }

    #[test]
    fn pattern_keys_match_like_get_pattern_key() {
        let c = config(
            r#"{"peft_type":"LORA","r":8,"target_modules":"all-linear",
               "rank_pattern":{"layers.1.self_attn.q_proj":4,"q_proj":2,"^model.layers.0.mlp.up_proj":3,"j":5}}"#,
        );
        assert_eq!(c.site_plan("model.layers.1.self_attn.q_proj").rank, 4);
        assert_eq!(c.site_plan("model.layers.0.self_attn.q_proj").rank, 2);
        assert_eq!(c.site_plan("model.layers.0.mlp.up_proj").rank, 3);
        assert_eq!(c.site_plan("model.layers.1.mlp.up_proj").rank, 8);
        // "j" must match a whole dotted suffix, not the end of "k_proj".
        assert_eq!(c.site_plan("model.layers.0.self_attn.k_proj").rank, 8);
    }

    #[test]
    fn first_pattern_in_file_order_wins() {
        let c = config(
            r#"{"peft_type":"LORA","r":8,"target_modules":["v_proj"],"rank_pattern":{"v_proj":4,"self_attn.v_proj":6}}"#,
        );
        assert_eq!(c.site_plan("model.layers.0.self_attn.v_proj").rank, 4);
        let c = config(
            r#"{"peft_type":"LORA","r":8,"target_modules":["v_proj"],"rank_pattern":{"self_attn.v_proj":6,"v_proj":4}}"#,
        );
        assert_eq!(c.site_plan("model.layers.0.self_attn.v_proj").rank, 6);
    }

    #[test]
    fn exact_name_in_list_bypasses_layers_to_transform() {
        let c = config(
            r#"{"peft_type":"LORA","r":8,"layers_to_transform":[0],
               "target_modules":["q_proj","model.layers.1.self_attn.v_proj"]}"#,
        );
        assert!(c.modules.selects("model.layers.0.self_attn.q_proj"));
        assert!(!c.modules.selects("model.layers.1.self_attn.q_proj"));
        assert!(c.modules.selects("model.layers.1.self_attn.v_proj"));
        assert!(!c.modules.selects("model.layers.0.self_attn.v_proj"));
    }

    #[test]
    fn layers_pattern_selects_by_regex() {
        let c = config(
            r#"{"peft_type":"LORA","r":8,"layers_to_transform":1,"layers_pattern":"layers","target_modules":["o_proj"]}"#,
        );
        assert!(c.modules.selects("model.layers.1.self_attn.o_proj"));
        assert!(!c.modules.selects("model.layers.0.self_attn.o_proj"));
        let c = config(
            r#"{"peft_type":"LORA","r":8,"layers_to_transform":[1],"layers_pattern":["h"],"target_modules":["o_proj"]}"#,
        );
        assert!(!c.modules.selects("model.layers.1.self_attn.o_proj"));
    }
}
