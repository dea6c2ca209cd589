//! Parameters addressed by their dotted path (`blocks.0.filter.complex_weight`). Because our
//! layers use PyTorch's names and layouts, these paths are the reference `state_dict` keys, so
//! one mechanism serves checkpoints and reference-weight import.

use std::collections::BTreeMap;

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param, ParamId};
use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};

/// A host-side f32 tensor: what checkpoints and imported weights hold.
#[derive(Debug, Clone, PartialEq)]
pub struct HostTensor {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

impl HostTensor {
    pub fn new(shape: Vec<usize>, data: Vec<f32>) -> Self {
        debug_assert_eq!(shape.iter().product::<usize>(), data.len());
        Self { shape, data }
    }

    pub fn from_tensor<B: Backend, const D: usize>(t: &Tensor<B, D>) -> Self {
        let data = t.to_data().convert::<f32>();
        Self {
            shape: data.shape.to_vec(),
            data: data.to_vec::<f32>().unwrap_or_default(),
        }
    }

    pub fn to_tensor<B: Backend, const D: usize>(&self, device: &B::Device) -> Tensor<B, D> {
        Tensor::from_data(TensorData::new(self.data.clone(), self.shape.clone()), device)
    }
}

pub type StateDict = BTreeMap<String, HostTensor>;

/// The dotted path of the module being visited. Enum variants are transparent: a field holding
/// an enum (`AnyBackbone`, or a layer that is one of several kinds) contributes no path segment,
/// so `AnyBackbone::Gfnet(m)` has the same parameter names as `m` — the reference names.
struct PathTracker {
    stack: Vec<Option<String>>,
}

impl PathTracker {
    fn enter(&mut self, name: &str, container: &str) {
        let transparent = container.starts_with("Enum:");
        self.stack.push((!transparent).then(|| name.to_string()));
    }
    fn exit(&mut self) {
        self.stack.pop();
    }
    fn path(&self) -> String {
        let parts: Vec<&str> = self.stack.iter().flatten().map(String::as_str).collect();
        parts.join(".")
    }
}

struct Collector {
    path: PathTracker,
    out: StateDict,
}

impl<B: Backend> ModuleVisitor<B> for Collector {
    fn enter_module(&mut self, name: &str, container: &str) {
        self.path.enter(name, container);
    }
    fn exit_module(&mut self, _name: &str, _container: &str) {
        self.path.exit();
    }
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        self.out.insert(self.path.path(), HostTensor::from_tensor(&param.val()));
    }
}

/// Every float parameter and running statistic of `module`, keyed by its dotted path.
/// The device a module's parameters are on (the backend's default for a module without any).
pub fn device_of<B: Backend, M: Module<B>>(module: &M) -> B::Device {
    module.devices().into_iter().next().unwrap_or_default()
}

pub fn state_dict<B: Backend, M: Module<B>>(module: &M) -> StateDict {
    let mut c = Collector { path: PathTracker { stack: Vec::new() }, out: BTreeMap::new() };
    module.visit(&mut c);
    c.out
}

/// Names and shapes, without copying data.
pub fn param_shapes<B: Backend, M: Module<B>>(module: &M) -> BTreeMap<String, Vec<usize>> {
    struct Shapes {
        path: PathTracker,
        out: BTreeMap<String, Vec<usize>>,
    }
    impl<B: Backend> ModuleVisitor<B> for Shapes {
        fn enter_module(&mut self, name: &str, container: &str) {
            self.path.enter(name, container);
        }
        fn exit_module(&mut self, _n: &str, _c: &str) {
            self.path.exit();
        }
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            self.out.insert(self.path.path(), param.val().dims().to_vec());
        }
    }
    let mut s = Shapes { path: PathTracker { stack: Vec::new() }, out: BTreeMap::new() };
    module.visit(&mut s);
    s.out
}

/// Learnable parameters, as PyTorch's `sum(p.numel() for p in model.parameters())` counts them:
/// burn's `num_params` also counts BatchNorm's running statistics, which are buffers there.
pub fn trainable_param_count<B: Backend, M: Module<B>>(module: &M) -> usize {
    param_shapes::<B, M>(module)
        .iter()
        .filter(|(k, _)| !k.ends_with("running_mean") && !k.ends_with("running_var"))
        .map(|(_, s)| s.iter().product::<usize>())
        .sum()
}

/// What went wrong when loading a state dict, by parameter name.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct LoadReport {
    pub missing: Vec<String>,
    pub unexpected: Vec<String>,
    /// (name, expected shape, found shape)
    pub mis_shaped: Vec<(String, Vec<usize>, Vec<usize>)>,
}

impl LoadReport {
    pub fn is_clean(&self) -> bool {
        self.missing.is_empty() && self.unexpected.is_empty() && self.mis_shaped.is_empty()
    }
}

impl std::fmt::Display for LoadReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut parts = Vec::new();
        let list = |v: &[String]| {
            let shown: Vec<&str> = v.iter().take(8).map(String::as_str).collect();
            let more = if v.len() > 8 { format!(" (+{} more)", v.len() - 8) } else { String::new() };
            format!("{}{more}", shown.join(", "))
        };
        if !self.missing.is_empty() {
            parts.push(format!("missing keys: {}", list(&self.missing)));
        }
        if !self.unexpected.is_empty() {
            parts.push(format!("unexpected keys: {}", list(&self.unexpected)));
        }
        if !self.mis_shaped.is_empty() {
            let v: Vec<String> = self
                .mis_shaped
                .iter()
                .take(8)
                .map(|(n, e, g)| format!("{n} (model {e:?}, file {g:?})"))
                .collect();
            parts.push(format!("mis-shaped keys: {}", v.join(", ")));
        }
        write!(f, "{}", parts.join("; "))
    }
}

struct Loader<'a> {
    path: PathTracker,
    dict: &'a StateDict,
    seen: Vec<String>,
    report: LoadReport,
}

impl<B: Backend> ModuleMapper<B> for Loader<'_> {
    fn enter_module(&mut self, name: &str, container: &str) {
        self.path.enter(name, container);
    }
    fn exit_module(&mut self, _n: &str, _c: &str) {
        self.path.exit();
    }
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        let name = self.path.path();
        let (id, old, mapper): (ParamId, Tensor<B, D>, _) = param.consume();
        let expected = old.dims().to_vec();
        let new = match self.dict.get(&name) {
            None => {
                self.report.missing.push(name);
                old
            }
            Some(t) if t.shape != expected => {
                self.seen.push(name.clone());
                self.report.mis_shaped.push((name, expected, t.shape.clone()));
                old
            }
            Some(t) => {
                self.seen.push(name);
                let require_grad = old.is_require_grad();
                t.to_tensor::<B, D>(&old.device()).set_require_grad(require_grad)
            }
        };
        Param::from_mapped_value(id, new, mapper)
    }
}

/// Loads `dict` into `module` by name. Nothing is partially applied on error: the caller gets
/// the report and decides; `load_strict` turns any problem into an error.
pub fn load_state_dict<B: Backend, M: Module<B>>(module: M, dict: &StateDict) -> (M, LoadReport) {
    let mut loader = Loader {
        path: PathTracker { stack: Vec::new() },
        dict,
        seen: Vec::new(),
        report: LoadReport::default(),
    };
    let module = module.map(&mut loader);
    let seen: std::collections::BTreeSet<&String> = loader.seen.iter().collect();
    loader.report.unexpected = dict.keys().filter(|k| !seen.contains(k)).cloned().collect();
    (module, loader.report)
}

/// Loads and fails, naming the keys, unless every parameter matched exactly.
pub fn load_strict<B: Backend, M: Module<B> + Clone>(
    module: M,
    dict: &StateDict,
    source: &str,
) -> anyhow::Result<M> {
    load_strict_except(module, dict, source, None)
}

/// [`load_strict`] for every parameter outside the module path `fresh` (e.g. `head`), which
/// keeps the module's own initialisation; the weights' entries under `fresh` are left out.
pub fn load_strict_except<B: Backend, M: Module<B> + Clone>(
    module: M,
    dict: &StateDict,
    source: &str,
    fresh: Option<&str>,
) -> anyhow::Result<M> {
    let under = |k: &str| fresh.is_some_and(|f| k == f || k.strip_prefix(f).is_some_and(|rest| rest.starts_with('.')));
    let kept: StateDict;
    let dict = if fresh.is_some() {
        kept = dict.iter().filter(|(k, _)| !under(k)).map(|(k, v)| (k.clone(), v.clone())).collect();
        &kept
    } else {
        dict
    };
    // Check first so that a failed load leaves the caller's module untouched.
    let mut shapes = param_shapes::<B, M>(&module);
    shapes.retain(|k, _| !under(k));
    let mut report = LoadReport::default();
    for (name, shape) in &shapes {
        match dict.get(name) {
            None => report.missing.push(name.clone()),
            Some(t) if &t.shape != shape => {
                report.mis_shaped.push((name.clone(), shape.clone(), t.shape.clone()))
            }
            _ => {}
        }
    }
    report.unexpected = dict.keys().filter(|k| !shapes.contains_key(*k)).cloned().collect();
    if !report.is_clean() {
        anyhow::bail!("{source}: weights do not fit the model: {report}");
    }
    Ok(load_state_dict(module, dict).0)
}
