//! `adapter_config.json` parsing and PEFT's rules for which modules it targets.
//! Owns parsing (pattern maps kept in file order), the matching rules (`target_modules`,
//! `exclude_modules`, `layers_to_transform`/`layers_pattern`, `rank_pattern`/`alpha_pattern`
//! and scaling) and the refusal of PEFT features we do not implement.
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

/// How `target_modules` / `exclude_modules` select module names (PEFT's
/// `check_target_module_exists`).
enum Selector {
    /// A name matches if it equals an entry or ends with `"." + entry`.
    Names(Vec<String>),
    /// `re.fullmatch` against the whole module name.
    Regex(String, Regex),
    /// The `"all-linear"` shorthand: every linear layer but the output head.
    AllLinear,
}

impl Selector {
    fn parse(field: &str, value: &Value) -> Result<Selector, AdapterError> {
        match value {
            Value::String(s) if field == "target_modules" && s.to_lowercase() == "all-linear" => {
                Ok(Selector::AllLinear)
            }
            Value::String(s) => Ok(Selector::Regex(
                s.clone(),
                compile(field, s, &format!("^(?:{s})$"))?,
            )),
            Value::Array(items) => Ok(Selector::Names(strings(field, items)?)),
            other => Err(Invalid(format!(
                "config: {field} must be a list of module names or a regex string, not {other}"
            ))),
        }
    }

    /// Matching without the layer filter (which PEFT applies to the suffix case only).
    fn matches(&self, path: &str) -> bool {
        match self {
            Selector::Names(names) => names.iter().any(|n| n == path || ends_with_dotted(path, n)),
            Selector::Regex(_, re) => re.is_match(path),
            Selector::AllLinear => true,
        }
    }
}

fn ends_with_dotted(path: &str, name: &str) -> bool {
    path.len() > name.len()
        && path.ends_with(name)
        && path[..path.len() - name.len()].ends_with('.')
}

/// `layers_to_transform` with `layers_pattern`.
struct LayerFilter {
    indexes: Vec<usize>,
    /// Compiled `re.match(rf".*\.{pattern}\.(\d+)\.")` per `layers_pattern` entry, or
    /// PEFT's default `r".*\.[^.]*\.(\d+)\."` when there is none.
    patterns: Vec<Regex>,
}

impl LayerFilter {
    fn accepts(&self, path: &str) -> bool {
        let capture = |re: &Regex| re.captures(path)?.get(1)?.as_str().parse::<usize>().ok();
        self.patterns
            .iter()
            .find_map(capture)
            .is_some_and(|i| self.indexes.contains(&i))
    }
}

/// Rank and scale of one targeted site.
#[derive(Clone, Copy, Debug)]
pub(super) struct SitePlan {
    pub(super) rank: usize,
    pub(super) scale: f32,
}

pub(super) type Plan = Vec<[Option<SitePlan>; 7]>;

/// Which module names a config selects: `target_modules`, `exclude_modules` and
/// `layers_to_transform`/`layers_pattern`, with PEFT's rules (shared by every method).
pub(super) struct ModuleMatch {
    targets: Selector,
    exclude: Option<Selector>,
    layers: Option<LayerFilter>,
}

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

impl ModuleMatch {
    /// `target_modules` (PEFT's default for Llama, `default_targets`, when absent),
    /// `exclude_modules` and, if `with_layers`, the layer filter.
    pub(super) fn parse(
        raw: &RawConfig,
        default_targets: &[&str],
        with_layers: bool,
    ) -> Result<ModuleMatch, AdapterError> {
        let targets = match raw.get("target_modules") {
            None => Selector::Names(default_targets.iter().map(|s| s.to_string()).collect()),
            Some(v) => Selector::parse("target_modules", v)?,
        };
        let exclude = match raw.get("exclude_modules") {
            Some(v) if is_set(v) => Some(Selector::parse("exclude_modules", v)?),
            _ => None,
        };
        let layers = if with_layers {
            layer_filter(raw, &targets)?
        } else {
            None
        };
        Ok(ModuleMatch {
            targets,
            exclude,
            layers,
        })
    }

    /// `selects` for every (layer, site) of the base: `[layer][site.index()]`; an error
    /// when a listed target is unknown or nothing is selected.
    pub(super) fn selected(&self, base: &BaseShape) -> Result<Vec<[bool; 7]>, AdapterError> {
        self.check_known_targets(base)?;
        let selected: Vec<[bool; 7]> = (0..base.num_layers)
            .map(|layer| {
                std::array::from_fn(|i| self.selects(&LoraSite::ALL[i].module_path(layer)))
            })
            .collect();
        if !selected.iter().flatten().any(|&s| s) {
            return Err(Invalid(
                "config: target_modules selects no linear module of the base model".into(),
            ));
        }
        Ok(selected)
    }

    /// PEFT's `check_target_module_exists` for one module name.
    pub(super) fn selects(&self, path: &str) -> bool {
        if self.exclude.as_ref().is_some_and(|e| e.matches(path)) {
            return false;
        }
        match &self.targets {
            Selector::Names(names) if names.iter().any(|n| n == path) => true,
            Selector::Names(_) => {
                self.targets.matches(path) && self.layers.as_ref().is_none_or(|f| f.accepts(path))
            }
            other => other.matches(path),
        }
    }

    /// Every listed target must name a Llama linear site; a regex must not reach the
    /// embeddings or the head.
    fn check_known_targets(&self, base: &BaseShape) -> Result<(), AdapterError> {
        let embedding = |name: &str| {
            let last = name.rsplit('.').next().unwrap_or(name);
            last == "embed_tokens" || last == "lm_head"
        };
        match &self.targets {
            Selector::Names(names) => {
                for name in names {
                    let known = (0..base.num_layers.max(1)).any(|layer| {
                        LoraSite::ALL.iter().any(|s| {
                            let path = s.module_path(layer);
                            path == *name || ends_with_dotted(&path, name)
                        })
                    });
                    if known {
                        continue;
                    }
                    if embedding(name) {
                        return Err(Unsupported(format!(
                            "embedding/lm_head LoRA (target_modules entry \"{name}\")"
                        )));
                    }
                    return Err(Invalid(format!("unknown target module {name}")));
                }
            }
            Selector::Regex(source, re) => {
                if re.is_match("lm_head") || re.is_match("model.embed_tokens") {
                    return Err(Unsupported(format!(
                        "embedding/lm_head LoRA (target_modules regex \"{source}\" selects them)"
                    )));
                }
            }
            Selector::AllLinear => {}
        }
        Ok(())
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
                    sites[i].then(|| self.site_plan(&site.module_path(layer)))
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

fn layer_filter(raw: &RawConfig, targets: &Selector) -> Result<Option<LayerFilter>, AdapterError> {
    let to_transform = raw.get("layers_to_transform");
    let pattern = raw.get("layers_pattern");
    if matches!(targets, Selector::Regex(..) | Selector::AllLinear) {
        for (field, value) in [
            ("layers_to_transform", to_transform),
            ("layers_pattern", pattern),
        ] {
            if value.is_some() {
                return Err(Invalid(format!(
                    "config: {field} cannot be used when target_modules is a string"
                )));
            }
        }
    }
    if pattern.is_some_and(is_set) && !to_transform.is_some_and(is_set) {
        return Err(Invalid(
            "config: layers_pattern requires layers_to_transform".into(),
        ));
    }
    let indexes = match to_transform {
        None => return Ok(None),
        Some(Value::Array(items)) if items.is_empty() => return Ok(None),
        Some(Value::Array(items)) => items
            .iter()
            .map(|v| index("layers_to_transform", v))
            .collect::<Result<_, _>>()?,
        Some(v) => vec![index("layers_to_transform", v)?],
    };
    let names = match pattern {
        None => Vec::new(),
        Some(Value::Array(items)) => strings("layers_pattern", items)?,
        Some(Value::String(s)) if s.is_empty() => Vec::new(),
        Some(Value::String(s)) => vec![s.clone()],
        Some(other) => {
            return Err(Invalid(format!(
                "config: layers_pattern must be a string or a list, not {other}"
            )))
        }
    };
    let patterns = if names.is_empty() {
        vec![compile("layers_pattern", "", r"^.*\.[^.]*\.(\d+)\.")?]
    } else {
        let compiled = names
            .iter()
            .map(|p| compile("layers_pattern", p, &format!(r"^.*\.{p}\.(\d+)\.")));
        compiled.collect::<Result<_, _>>()?
    };
    Ok(Some(LayerFilter { indexes, patterns }))
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

fn compile(field: &str, source: &str, pattern: &str) -> Result<Regex, AdapterError> {
    Regex::new(pattern).map_err(|e| {
        Unsupported(format!(
            "config: {field} regex \"{source}\" cannot be evaluated here: {e}"
        ))
    })
}

fn strings(field: &str, items: &[Value]) -> Result<Vec<String>, AdapterError> {
    items
        .iter()
        .map(|v| match v {
            Value::String(s) => Ok(s.clone()),
            other => Err(Invalid(format!(
                "config: {field} entries must be strings, not {other}"
            ))),
        })
        .collect()
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

fn index(field: &str, value: &Value) -> Result<usize, AdapterError> {
    value
        .as_u64()
        .and_then(|n| usize::try_from(n).ok())
        .ok_or_else(|| {
            Invalid(format!(
                "config: {field} must hold layer indexes, not {value}"
            ))
        })
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
