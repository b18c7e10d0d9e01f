//! Reader for the legacy (pre-zip) torch serialization of a state dict.
//!
//! A legacy `.pth` file is five pickles followed by raw storages:
//! the magic number, the protocol version, a `sys_info` dict, the state dict
//! (tensors point at storages through persistent ids), and the list of storage
//! keys; then, for each key in that order, an 8-byte little-endian element
//! count and the raw little-endian data.
//!
//! Reading must never execute code, so this is not a general unpickler: a tiny
//! stack machine interprets only the opcodes a state dict uses and resolves only
//! an allow-list of globals (`collections.OrderedDict`, torch's tensor
//! rebuilders and storage types). Any other opcode or global is an error that
//! names it.
//!
//! Nor may a hostile file exhaust memory or crash the reader: every value the
//! pickles build counts against `MAX_PICKLE_NODES` (copies made through the
//! memo count again, which stops "billion laughs" files that double a list
//! at every level), containers nest at most `MAX_NESTING` deep, the tensors
//! may not add up to more than `MAX_EXPANSION` times the bytes of the file's
//! storages (a stride-0 view cannot turn 4 bytes into terabytes), and all
//! size, stride and offset arithmetic is checked.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};

/// The magic number torch writes first in a legacy file.
const LEGACY_MAGIC: i128 = 0x1950a86a20f9469cfc6c;
/// The only legacy protocol version torch has written.
const LEGACY_PROTOCOL: i64 = 1001;
/// Values the pickles of one file may build, memo copies included (a string
/// counts one more per 64 bytes). A state dict needs a few dozen per tensor;
/// at the limit the values take a few hundred megabytes.
pub const MAX_PICKLE_NODES: usize = 1 << 21;
/// How deep containers may nest (a state dict needs four levels); it also
/// bounds the recursion of cloning and dropping values.
pub const MAX_NESTING: usize = 32;
/// The tensors may hold at most this many times the bytes of the file's
/// storages (plus `EXPANSION_SLACK_BYTES`): views of one storage, tied
/// weights and small broadcast views fit easily.
pub const MAX_EXPANSION: usize = 4;
const EXPANSION_SLACK_BYTES: usize = 1 << 20;

/// Errors while reading a legacy `.pth` stream.
#[derive(Debug, thiserror::Error)]
pub enum PthError {
    #[error("not a legacy torch file: {0}")]
    NotLegacy(String),
    #[error("truncated file: needed {needed} bytes at offset {offset}, {available} available")]
    Truncated {
        offset: usize,
        needed: usize,
        available: usize,
    },
    #[error(
        "refusing pickle opcode 0x{opcode:02x} ('{printable}') at offset {offset}: a state dict does not need it"
    )]
    ForbiddenOpcode {
        opcode: u8,
        printable: char,
        offset: usize,
    },
    #[error("refusing global '{module}.{name}': only state-dict globals are allowed")]
    ForbiddenGlobal { module: String, name: String },
    #[error("malformed pickle at offset {offset}: {message}")]
    Malformed { offset: usize, message: String },
    #[error("refusing the pickle at offset {offset}: {message}")]
    TooLarge { offset: usize, message: String },
    #[error("unsupported storage type '{0}' (supported: Float, Double, Half, BFloat16, Long)")]
    UnsupportedStorage(String),
    #[error("storage '{key}': {message}")]
    Storage { key: String, message: String },
    #[error("tensor '{name}': {message}")]
    Tensor { name: String, message: String },
    #[error("the pickled object is not a state dict (an OrderedDict or dict of tensors)")]
    NotStateDict,
    #[error("candle: {0}")]
    Candle(#[from] candle_core::Error),
}

/// Element type of a torch storage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StorageType {
    Float,
    Double,
    Half,
    BFloat16,
    Long,
}

impl StorageType {
    fn from_class_name(name: &str) -> Result<Self, PthError> {
        Ok(match name {
            "FloatStorage" => StorageType::Float,
            "DoubleStorage" => StorageType::Double,
            "HalfStorage" => StorageType::Half,
            "BFloat16Storage" => StorageType::BFloat16,
            "LongStorage" => StorageType::Long,
            other => return Err(PthError::UnsupportedStorage(other.to_string())),
        })
    }

    fn element_size(self) -> usize {
        match self {
            StorageType::Float => 4,
            StorageType::Double | StorageType::Long => 8,
            StorageType::Half | StorageType::BFloat16 => 2,
        }
    }

    fn dtype(self) -> DType {
        match self {
            StorageType::Float => DType::F32,
            StorageType::Double => DType::F64,
            StorageType::Half => DType::F16,
            StorageType::BFloat16 => DType::BF16,
            StorageType::Long => DType::I64,
        }
    }
}

/// The globals a state dict may reference.
#[derive(Debug, Clone, PartialEq)]
enum Global {
    OrderedDict,
    RebuildTensorV2,
    RebuildParameter,
    Storage(StorageType),
}

fn resolve_global(module: &str, name: &str) -> Result<Global, PthError> {
    match (module, name) {
        ("collections", "OrderedDict") => Ok(Global::OrderedDict),
        ("torch._utils", "_rebuild_tensor_v2") => Ok(Global::RebuildTensorV2),
        ("torch._utils", "_rebuild_parameter") => Ok(Global::RebuildParameter),
        ("torch", class) if class.ends_with("Storage") => {
            StorageType::from_class_name(class).map(Global::Storage)
        }
        _ => Err(PthError::ForbiddenGlobal {
            module: module.to_string(),
            name: name.to_string(),
        }),
    }
}

/// A tensor as the pickle describes it: a view into a storage.
#[derive(Debug, Clone, PartialEq)]
struct TensorView {
    storage_key: String,
    storage_type: StorageType,
    offset: usize,
    shape: Vec<usize>,
    stride: Vec<usize>,
}

#[derive(Debug, Clone, PartialEq)]
enum Value {
    None,
    Bool(bool),
    Int(i128),
    Str(String),
    Tuple(Vec<Value>),
    List(Vec<Value>),
    Dict(Vec<(Value, Value)>),
    Global(Global),
    Storage {
        key: String,
        storage_type: StorageType,
        numel: usize,
    },
    Tensor(TensorView),
}

/// A pickle stream being interpreted, with a cursor into the whole file.
struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
    /// Values built so far, in all pickles of the file (see `MAX_PICKLE_NODES`).
    nodes: usize,
}

/// The weight of a value against `MAX_PICKLE_NODES`, counted up to `limit`
/// (`None` past it): one per value, plus one per 64 bytes of a string.
fn weight_within(value: &Value, limit: usize) -> Option<usize> {
    let own = match value {
        Value::Str(text) => 1 + text.len() / 64,
        Value::Storage { key, .. } => 1 + key.len() / 64,
        Value::Tensor(view) => 1 + view.storage_key.len() / 64 + view.shape.len(),
        _ => 1,
    };
    let mut total = own;
    let children: Box<dyn Iterator<Item = &Value>> = match value {
        Value::Tuple(items) | Value::List(items) => Box::new(items.iter()),
        Value::Dict(items) => Box::new(items.iter().flat_map(|(k, v)| [k, v])),
        _ => Box::new(std::iter::empty()),
    };
    for child in children {
        if total > limit {
            return None;
        }
        total = total.checked_add(weight_within(child, limit - total)?)?;
    }
    (total <= limit).then_some(total)
}

/// How deeply a value's containers nest (0 for a scalar), counted up to
/// `MAX_NESTING + 1`. Values are built with checked nesting, so the
/// recursion is bounded too.
fn nesting(value: &Value) -> usize {
    let items: Box<dyn Iterator<Item = &Value>> = match value {
        Value::Tuple(items) | Value::List(items) => Box::new(items.iter()),
        Value::Dict(items) => Box::new(items.iter().flat_map(|(k, v)| [k, v])),
        _ => return 0,
    };
    1 + items.map(nesting).max().unwrap_or(0)
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], PthError> {
        let available = self.bytes.len().saturating_sub(self.pos);
        if n > available {
            return Err(PthError::Truncated {
                offset: self.pos,
                needed: n,
                available,
            });
        }
        let slice = &self.bytes[self.pos..self.pos + n];
        self.pos += n;
        Ok(slice)
    }

    fn u8(&mut self) -> Result<u8, PthError> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> Result<u16, PthError> {
        Ok(u16::from_le_bytes(
            self.take(2)?.try_into().expect("2 bytes"),
        ))
    }

    fn u32(&mut self) -> Result<u32, PthError> {
        Ok(u32::from_le_bytes(
            self.take(4)?.try_into().expect("4 bytes"),
        ))
    }

    fn u64(&mut self) -> Result<u64, PthError> {
        Ok(u64::from_le_bytes(
            self.take(8)?.try_into().expect("8 bytes"),
        ))
    }

    fn line(&mut self) -> Result<String, PthError> {
        let rest = &self.bytes[self.pos..];
        let end = rest
            .iter()
            .position(|&b| b == b'\n')
            .ok_or_else(|| self.malformed("unterminated GLOBAL line"))?;
        let text = String::from_utf8(rest[..end].to_vec())
            .map_err(|_| self.malformed("GLOBAL line is not UTF-8"))?;
        self.pos += end + 1;
        Ok(text)
    }

    fn utf8(&mut self, n: usize) -> Result<String, PthError> {
        let offset = self.pos;
        String::from_utf8(self.take(n)?.to_vec()).map_err(|_| PthError::Malformed {
            offset,
            message: "string is not UTF-8".into(),
        })
    }

    fn malformed(&self, message: impl Into<String>) -> PthError {
        PthError::Malformed {
            offset: self.pos,
            message: message.into(),
        }
    }

    /// Counts `value` against `MAX_PICKLE_NODES` (a new value, or a copy).
    fn spend(&mut self, value: &Value, offset: usize) -> Result<(), PthError> {
        let left = MAX_PICKLE_NODES.saturating_sub(self.nodes);
        match weight_within(value, left) {
            Some(weight) => {
                self.nodes += weight;
                Ok(())
            }
            None => Err(PthError::TooLarge {
                offset,
                message: format!(
                    "the pickles build more than {MAX_PICKLE_NODES} values (memo copies included); \
                     a state dict needs far fewer"
                ),
            }),
        }
    }

    /// Refuses `value` as an item of a container if that would nest deeper than `MAX_NESTING`.
    fn check_item(&self, value: &Value, offset: usize) -> Result<(), PthError> {
        if nesting(value) >= MAX_NESTING {
            return Err(PthError::TooLarge {
                offset,
                message: format!("containers nested deeper than {MAX_NESTING} levels"),
            });
        }
        Ok(())
    }

    /// Stores a copy of the stack top in the memo, counting the copy.
    fn memoize(
        &mut self,
        memo: &mut HashMap<u32, Value>,
        index: u32,
        stack: &[Value],
        offset: usize,
    ) -> Result<(), PthError> {
        let value = top(stack, offset)?;
        self.spend(value, offset)?;
        memo.insert(index, value.clone());
        Ok(())
    }

    /// Pushes a freshly built value, counting it.
    fn push(
        &mut self,
        stack: &mut Vec<Value>,
        value: Value,
        offset: usize,
    ) -> Result<(), PthError> {
        self.spend(&value, offset)?;
        stack.push(value);
        Ok(())
    }

    /// Interprets one pickle, up to and including its STOP opcode.
    fn load(&mut self) -> Result<Value, PthError> {
        let mut stack: Vec<Value> = Vec::new();
        let mut marks: Vec<usize> = Vec::new();
        let mut memo: HashMap<u32, Value> = HashMap::new();
        loop {
            let offset = self.pos;
            let opcode = self.u8()?;
            match opcode {
                // PROTO: protocol 2 to 5 all use the opcodes below.
                0x80 => {
                    self.u8()?;
                }
                // FRAME: a length prefix, irrelevant when the whole stream is in memory.
                0x95 => {
                    self.u64()?;
                }
                b'.' => {
                    return match (stack.pop(), stack.is_empty()) {
                        (Some(value), true) => Ok(value),
                        _ => Err(self.malformed("STOP with a stack that does not hold one value")),
                    };
                }
                b'(' => marks.push(stack.len()),
                b'}' => self.push(&mut stack, Value::Dict(Vec::new()), offset)?,
                b']' => self.push(&mut stack, Value::List(Vec::new()), offset)?,
                b')' => self.push(&mut stack, Value::Tuple(Vec::new()), offset)?,
                b'N' => self.push(&mut stack, Value::None, offset)?,
                0x88 => self.push(&mut stack, Value::Bool(true), offset)?,
                0x89 => self.push(&mut stack, Value::Bool(false), offset)?,
                b'K' => {
                    let value = Value::Int(self.u8()? as i128);
                    self.push(&mut stack, value, offset)?;
                }
                b'M' => {
                    let value = Value::Int(self.u16()? as i128);
                    self.push(&mut stack, value, offset)?;
                }
                b'J' => {
                    let value = Value::Int(self.u32()? as i32 as i128);
                    self.push(&mut stack, value, offset)?;
                }
                // LONG1: little-endian two's complement, used for the magic number.
                0x8a => {
                    let n = self.u8()? as usize;
                    if n > 16 {
                        return Err(self.malformed(format!("LONG1 of {n} bytes is too large")));
                    }
                    let bytes = self.take(n)?;
                    let mut value: i128 = 0;
                    for (i, &b) in bytes.iter().enumerate() {
                        value |= (b as i128) << (8 * i);
                    }
                    if n > 0 && n < 16 && bytes[n - 1] & 0x80 != 0 {
                        value -= 1i128 << (8 * n);
                    }
                    self.push(&mut stack, Value::Int(value), offset)?;
                }
                b'X' => {
                    let n = self.u32()? as usize;
                    let value = Value::Str(self.utf8(n)?);
                    self.push(&mut stack, value, offset)?;
                }
                0x8c => {
                    let n = self.u8()? as usize;
                    let value = Value::Str(self.utf8(n)?);
                    self.push(&mut stack, value, offset)?;
                }
                b't' => {
                    let items = pop_mark(&mut stack, &mut marks, offset)?;
                    for item in &items {
                        self.check_item(item, offset)?;
                    }
                    self.push(&mut stack, Value::Tuple(items), offset)?;
                }
                0x85..=0x87 => {
                    let n = (opcode - 0x84) as usize;
                    if stack.len() < n {
                        return Err(self.malformed("TUPLE with too few stack items"));
                    }
                    let items = stack.split_off(stack.len() - n);
                    for item in &items {
                        self.check_item(item, offset)?;
                    }
                    self.push(&mut stack, Value::Tuple(items), offset)?;
                }
                b'q' => {
                    let index = self.u8()? as u32;
                    self.memoize(&mut memo, index, &stack, offset)?;
                }
                b'r' => {
                    let index = self.u32()?;
                    self.memoize(&mut memo, index, &stack, offset)?;
                }
                0x94 => {
                    let index = memo.len() as u32;
                    self.memoize(&mut memo, index, &stack, offset)?;
                }
                b'h' | b'j' => {
                    let index = if opcode == b'h' {
                        self.u8()? as u32
                    } else {
                        self.u32()?
                    };
                    let value = memo
                        .get(&index)
                        .ok_or_else(|| self.malformed(format!("memo entry {index} is missing")))?;
                    // A copy: it counts again (memo "billion laughs").
                    self.spend(value, offset)?;
                    stack.push(value.clone());
                }
                b'c' => {
                    let module = self.line()?;
                    let name = self.line()?;
                    let value = Value::Global(resolve_global(&module, &name)?);
                    self.push(&mut stack, value, offset)?;
                }
                0x93 => {
                    let name = pop(&mut stack, offset)?;
                    let module = pop(&mut stack, offset)?;
                    match (module, name) {
                        (Value::Str(module), Value::Str(name)) => {
                            let value = Value::Global(resolve_global(&module, &name)?);
                            self.push(&mut stack, value, offset)?;
                        }
                        _ => return Err(self.malformed("STACK_GLOBAL needs two strings")),
                    }
                }
                b'Q' => {
                    let pid = pop(&mut stack, offset)?;
                    let value = storage_from_persistent_id(pid, offset)?;
                    self.push(&mut stack, value, offset)?;
                }
                b'R' => {
                    let args = pop(&mut stack, offset)?;
                    let callable = pop(&mut stack, offset)?;
                    let value = reduce(callable, args, offset)?;
                    self.push(&mut stack, value, offset)?;
                }
                b's' => {
                    let value = pop(&mut stack, offset)?;
                    let key = pop(&mut stack, offset)?;
                    self.check_item(&key, offset)?;
                    self.check_item(&value, offset)?;
                    match stack.last_mut() {
                        Some(Value::Dict(items)) => items.push((key, value)),
                        _ => return Err(self.malformed("SETITEM on something not a dict")),
                    }
                }
                b'u' => {
                    let items = pop_mark(&mut stack, &mut marks, offset)?;
                    for item in &items {
                        self.check_item(item, offset)?;
                    }
                    if items.len() % 2 != 0 {
                        return Err(self.malformed("SETITEMS with an odd number of items"));
                    }
                    let Some(Value::Dict(dict)) = stack.last_mut() else {
                        return Err(self.malformed("SETITEMS on something not a dict"));
                    };
                    let mut items = items.into_iter();
                    while let (Some(key), Some(value)) = (items.next(), items.next()) {
                        dict.push((key, value));
                    }
                }
                b'a' => {
                    let value = pop(&mut stack, offset)?;
                    self.check_item(&value, offset)?;
                    match stack.last_mut() {
                        Some(Value::List(list)) => list.push(value),
                        _ => return Err(self.malformed("APPEND on something not a list")),
                    }
                }
                b'e' => {
                    let items = pop_mark(&mut stack, &mut marks, offset)?;
                    for item in &items {
                        self.check_item(item, offset)?;
                    }
                    match stack.last_mut() {
                        Some(Value::List(list)) => list.extend(items),
                        _ => return Err(self.malformed("APPENDS on something not a list")),
                    }
                }
                // BUILD: torch sets `_metadata` (per-module versions) on the
                // OrderedDict. The loader does not need it, so the state is dropped.
                b'b' => {
                    let state = pop(&mut stack, offset)?;
                    match (stack.last(), state) {
                        (Some(Value::Dict(_)), Value::Dict(_) | Value::None) => {}
                        _ => {
                            return Err(self
                                .malformed("BUILD is only accepted on a dict with a dict state"));
                        }
                    }
                }
                other => {
                    return Err(PthError::ForbiddenOpcode {
                        opcode: other,
                        printable: if other.is_ascii_graphic() {
                            other as char
                        } else {
                            '?'
                        },
                        offset,
                    });
                }
            }
        }
    }
}

fn top(stack: &[Value], offset: usize) -> Result<&Value, PthError> {
    stack.last().ok_or(PthError::Malformed {
        offset,
        message: "memo store on an empty stack".into(),
    })
}

fn pop(stack: &mut Vec<Value>, offset: usize) -> Result<Value, PthError> {
    stack.pop().ok_or(PthError::Malformed {
        offset,
        message: "pop from an empty stack".into(),
    })
}

fn pop_mark(
    stack: &mut Vec<Value>,
    marks: &mut Vec<usize>,
    offset: usize,
) -> Result<Vec<Value>, PthError> {
    let mark = marks.pop().ok_or(PthError::Malformed {
        offset,
        message: "no MARK on the stack".into(),
    })?;
    if mark > stack.len() {
        return Err(PthError::Malformed {
            offset,
            message: "MARK above the stack top".into(),
        });
    }
    Ok(stack.split_off(mark))
}

fn malformed(offset: usize, message: impl Into<String>) -> PthError {
    PthError::Malformed {
        offset,
        message: message.into(),
    }
}

fn as_usize(value: &Value, what: &str, offset: usize) -> Result<usize, PthError> {
    match value {
        Value::Int(n) if *n >= 0 && *n <= usize::MAX as i128 => Ok(*n as usize),
        other => Err(malformed(
            offset,
            format!("{what}: expected a non-negative int, got {other:?}"),
        )),
    }
}

fn as_usize_tuple(value: &Value, what: &str, offset: usize) -> Result<Vec<usize>, PthError> {
    match value {
        Value::Tuple(items) => items.iter().map(|v| as_usize(v, what, offset)).collect(),
        other => Err(malformed(
            offset,
            format!("{what}: expected a tuple, got {other:?}"),
        )),
    }
}

/// `('storage', StorageType, key, location, numel[, view_metadata])`.
fn storage_from_persistent_id(pid: Value, offset: usize) -> Result<Value, PthError> {
    let Value::Tuple(items) = pid else {
        return Err(malformed(offset, "persistent id is not a tuple"));
    };
    match items.as_slice() {
        [
            Value::Str(tag),
            Value::Global(Global::Storage(storage_type)),
            Value::Str(key),
            Value::Str(_location),
            numel,
            rest @ ..,
        ] if tag == "storage" => {
            if rest.iter().any(|v| *v != Value::None) {
                return Err(malformed(
                    offset,
                    format!("storage '{key}': shared storage views are not supported"),
                ));
            }
            Ok(Value::Storage {
                key: key.clone(),
                storage_type: *storage_type,
                numel: as_usize(numel, "storage size", offset)?,
            })
        }
        _ => Err(malformed(
            offset,
            format!("unexpected persistent id {items:?}"),
        )),
    }
}

fn reduce(callable: Value, args: Value, offset: usize) -> Result<Value, PthError> {
    let Value::Tuple(args) = args else {
        return Err(malformed(offset, "REDUCE arguments are not a tuple"));
    };
    match callable {
        Value::Global(Global::OrderedDict) if args.is_empty() => Ok(Value::Dict(Vec::new())),
        // (storage, storage_offset, size, stride, requires_grad, backward_hooks[, metadata])
        Value::Global(Global::RebuildTensorV2) if args.len() >= 4 => {
            let Value::Storage {
                key, storage_type, ..
            } = &args[0]
            else {
                return Err(malformed(offset, "tensor without a storage"));
            };
            Ok(Value::Tensor(TensorView {
                storage_key: key.clone(),
                storage_type: *storage_type,
                offset: as_usize(&args[1], "storage offset", offset)?,
                shape: as_usize_tuple(&args[2], "size", offset)?,
                stride: as_usize_tuple(&args[3], "stride", offset)?,
            }))
        }
        // (data, requires_grad, backward_hooks): a parameter is its data here.
        Value::Global(Global::RebuildParameter) if !args.is_empty() => {
            match args.into_iter().next() {
                Some(tensor @ Value::Tensor(_)) => Ok(tensor),
                _ => Err(malformed(offset, "parameter without a tensor")),
            }
        }
        other => Err(malformed(
            offset,
            format!(
                "REDUCE of {other:?} with {} arguments is not allowed",
                args.len()
            ),
        )),
    }
}

/// One tensor of a state dict, in file order.
#[derive(Debug)]
pub struct NamedTensor {
    pub name: String,
    pub tensor: Tensor,
}

/// Parses a legacy `.pth` state dict into CPU tensors, in the file's key order.
pub fn read_legacy_state_dict(bytes: &[u8]) -> Result<Vec<NamedTensor>, PthError> {
    let mut reader = Reader {
        bytes,
        pos: 0,
        nodes: 0,
    };
    match reader.load() {
        Ok(Value::Int(LEGACY_MAGIC)) => {}
        Ok(_) => return Err(PthError::NotLegacy("wrong magic number".into())),
        Err(err) => {
            // A zip archive starts with "PK": the current torch format.
            if bytes.starts_with(b"PK") {
                return Err(PthError::NotLegacy(
                    "this is a zip-format torch file; only the legacy format is read here".into(),
                ));
            }
            return Err(err);
        }
    }
    match reader.load()? {
        Value::Int(n) if n == LEGACY_PROTOCOL as i128 => {}
        other => {
            return Err(PthError::NotLegacy(format!(
                "protocol version {other:?}, expected {LEGACY_PROTOCOL}"
            )));
        }
    }
    let sys_info = reader.load()?;
    check_little_endian(&sys_info)?;
    let object = reader.load()?;
    let Value::List(keys) = reader.load()? else {
        return Err(PthError::NotLegacy("storage key list missing".into()));
    };

    let entries = match object {
        Value::Dict(entries) => entries,
        _ => return Err(PthError::NotStateDict),
    };
    let mut views = Vec::with_capacity(entries.len());
    let mut storage_types: HashMap<String, StorageType> = HashMap::new();
    for (key, value) in entries {
        let (Value::Str(name), Value::Tensor(view)) = (key, value) else {
            return Err(PthError::NotStateDict);
        };
        storage_types.insert(view.storage_key.clone(), view.storage_type);
        views.push((name, view));
    }

    // The storages follow the pickles, in the order of the key list.
    let mut storages: HashMap<String, (usize, &[u8])> = HashMap::new();
    let mut storage_bytes = 0usize;
    for key in keys {
        let Value::Str(key) = key else {
            return Err(PthError::NotLegacy("storage key is not a string".into()));
        };
        let numel = usize::try_from(reader.u64()?).map_err(|_| PthError::Storage {
            key: key.clone(),
            message: "element count does not fit in memory".into(),
        })?;
        let element_size = storage_types
            .get(&key)
            .map(|t| t.element_size())
            .ok_or_else(|| PthError::Storage {
                key: key.clone(),
                message: "listed but no tensor uses it, so its element size is unknown".into(),
            })?;
        let length = numel
            .checked_mul(element_size)
            .ok_or_else(|| PthError::Storage {
                key: key.clone(),
                message: format!("element count {numel} overflows"),
            })?;
        let data = reader.take(length)?;
        storage_bytes += length; // at most the file's length
        storages.insert(key, (numel, data));
    }

    // What the tensors will hold, before anything is allocated for them.
    let allowed = storage_bytes
        .saturating_mul(MAX_EXPANSION)
        .saturating_add(EXPANSION_SLACK_BYTES);
    let mut total = 0usize;
    for (name, view) in &views {
        let bytes = view_bytes(name, view)?;
        total = total.saturating_add(bytes);
        if total > allowed {
            return Err(PthError::Tensor {
                name: name.clone(),
                message: format!(
                    "the tensors up to this one hold {total} bytes, more than {MAX_EXPANSION} times \
                     the {storage_bytes} bytes of the file's storages: refusing views that expand the file"
                ),
            });
        }
    }

    views
        .into_iter()
        .map(|(name, view)| {
            let tensor = materialize(&name, &view, &storages)?;
            Ok(NamedTensor { name, tensor })
        })
        .collect()
}

/// Elements and bytes of a view, checked against overflow.
fn view_bytes(name: &str, view: &TensorView) -> Result<usize, PthError> {
    view.shape
        .iter()
        .try_fold(1usize, |count, &size| count.checked_mul(size))
        .and_then(|count| count.checked_mul(view.storage_type.element_size()))
        .ok_or_else(|| PthError::Tensor {
            name: name.to_string(),
            message: format!("size {:?} overflows", view.shape),
        })
}

fn check_little_endian(sys_info: &Value) -> Result<(), PthError> {
    let Value::Dict(items) = sys_info else {
        return Err(PthError::NotLegacy("sys_info is not a dict".into()));
    };
    let little = items.iter().find_map(|(k, v)| match (k, v) {
        (Value::Str(k), Value::Bool(b)) if k == "little_endian" => Some(*b),
        _ => None,
    });
    match little {
        Some(true) => Ok(()),
        Some(false) => Err(PthError::NotLegacy(
            "big-endian files are not supported".into(),
        )),
        None => Err(PthError::NotLegacy("sys_info lacks little_endian".into())),
    }
}

/// Copies a (possibly strided) view out of its storage into a contiguous tensor.
fn materialize(
    name: &str,
    view: &TensorView,
    storages: &HashMap<String, (usize, &[u8])>,
) -> Result<Tensor, PthError> {
    let tensor_error = |message: String| PthError::Tensor {
        name: name.to_string(),
        message,
    };
    let (numel, data) = storages
        .get(&view.storage_key)
        .ok_or_else(|| tensor_error(format!("storage '{}' is missing", view.storage_key)))?;
    if view.shape.len() != view.stride.len() {
        return Err(tensor_error(format!(
            "size {:?} and stride {:?} differ in rank",
            view.shape, view.stride
        )));
    }
    let element_size = view.storage_type.element_size();
    let bytes = view_bytes(name, view)?;
    let count = bytes / element_size;
    let out_of_range = || {
        tensor_error(format!(
            "view (offset {}, size {:?}, stride {:?}) reaches past the storage of {numel} elements",
            view.offset, view.shape, view.stride
        ))
    };
    let mut out = Vec::with_capacity(bytes);
    if count > 0 {
        // The farthest element the view reaches; every index below it fits too.
        let last = view
            .shape
            .iter()
            .zip(&view.stride)
            .try_fold(view.offset, |reach, (&size, &stride)| {
                (size - 1)
                    .checked_mul(stride)
                    .and_then(|step| reach.checked_add(step))
            })
            .ok_or_else(out_of_range)?;
        if last >= *numel {
            return Err(out_of_range());
        }
        // Walk the view in row-major order with an odometer over the indices.
        let mut index = vec![0usize; view.shape.len()];
        for _ in 0..count {
            // At most `last`, so neither sum nor product overflows.
            let element: usize = view.offset
                + index
                    .iter()
                    .zip(&view.stride)
                    .map(|(i, s)| i * s)
                    .sum::<usize>();
            let start = element * element_size;
            out.extend_from_slice(&data[start..start + element_size]);
            for axis in (0..index.len()).rev() {
                index[axis] += 1;
                if index[axis] < view.shape[axis] {
                    break;
                }
                index[axis] = 0;
            }
        }
    }
    Ok(Tensor::from_raw_buffer(
        &out,
        view.storage_type.dtype(),
        &view.shape,
        &Device::Cpu,
    )?)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Writes pickle opcodes by hand, as torch's legacy `_save` would.
    #[derive(Default)]
    struct Pickle(Vec<u8>);

    impl Pickle {
        fn op(&mut self, bytes: &[u8]) -> &mut Self {
            self.0.extend_from_slice(bytes);
            self
        }
        fn string(&mut self, s: &str) -> &mut Self {
            self.0.push(b'X');
            self.0.extend_from_slice(&(s.len() as u32).to_le_bytes());
            self.0.extend_from_slice(s.as_bytes());
            self
        }
        fn int(&mut self, n: u8) -> &mut Self {
            self.op(&[b'K', n])
        }
        fn global(&mut self, module: &str, name: &str) -> &mut Self {
            self.0.push(b'c');
            self.0
                .extend_from_slice(format!("{module}\n{name}\n").as_bytes());
            self
        }
        fn tuple(&mut self, items: &[u8]) -> &mut Self {
            self.op(b"(");
            for &n in items {
                self.int(n);
            }
            self.op(b"t")
        }
        /// `_rebuild_tensor_v2(storage, offset, size, stride, False, OrderedDict())`.
        fn tensor(
            &mut self,
            class: &str,
            key: &str,
            numel: u8,
            offset: u8,
            size: &[u8],
            stride: &[u8],
        ) -> &mut Self {
            self.global("torch._utils", "_rebuild_tensor_v2").op(b"(");
            self.op(b"(")
                .string("storage")
                .global("torch", class)
                .string(key)
                .string("cpu")
                .int(numel)
                .op(b"Nt")
                .op(b"Q");
            self.int(offset).tuple(size).tuple(stride).op(&[0x89]);
            self.global("collections", "OrderedDict")
                .op(b")R")
                .op(b"t")
                .op(b"R")
        }
    }

    fn header() -> Vec<u8> {
        let mut p = Pickle::default();
        p.op(&[0x80, 2, 0x8a, 10]);
        p.op(&LEGACY_MAGIC.to_le_bytes()[..10]).op(b".");
        p.op(&[0x80, 2, b'M']).op(&1001u16.to_le_bytes()).op(b".");
        p.op(&[0x80, 2, b'}', b'(']);
        p.string("little_endian").op(&[0x88]).op(b"u.");
        p.0
    }

    /// A state dict with a transposed (non-contiguous) 2x3 float view at
    /// offset 1 and an int64 scalar, like BatchNorm's num_batches_tracked.
    fn tiny_file() -> Vec<u8> {
        let mut bytes = header();
        let mut p = Pickle::default();
        p.op(&[0x80, 2])
            .global("collections", "OrderedDict")
            .op(b")Rq\x01(");
        p.string("w.T")
            .tensor("FloatStorage", "k0", 7, 1, &[2, 3], &[1, 2])
            .op(b"q\x02");
        p.string("bn.num_batches_tracked")
            .tensor("LongStorage", "k1", 1, 0, &[], &[]);
        p.op(b"u}b.");
        // Storage keys.
        p.op(&[0x80, 2, b']', b'('])
            .string("k0")
            .string("k1")
            .op(b"e.");
        bytes.extend_from_slice(&p.0);
        bytes.extend_from_slice(&7u64.to_le_bytes());
        for v in 0..7 {
            bytes.extend_from_slice(&(v as f32).to_le_bytes());
        }
        bytes.extend_from_slice(&1u64.to_le_bytes());
        bytes.extend_from_slice(&42i64.to_le_bytes());
        bytes
    }

    #[test]
    fn reads_strided_float_and_int64_tensors() {
        let tensors = read_legacy_state_dict(&tiny_file()).unwrap();
        assert_eq!(tensors.len(), 2);
        assert_eq!(tensors[0].name, "w.T");
        // storage [0..7), offset 1, stride (1, 2): rows are [1,3,5] and [2,4,6].
        let w: Vec<Vec<f32>> = tensors[0].tensor.to_vec2().unwrap();
        assert_eq!(w, vec![vec![1.0, 3.0, 5.0], vec![2.0, 4.0, 6.0]]);
        assert_eq!(tensors[1].tensor.dtype(), DType::I64);
        assert_eq!(tensors[1].tensor.to_scalar::<i64>().unwrap(), 42);
    }

    #[test]
    fn rejects_os_system_global() {
        let mut bytes = header();
        let mut p = Pickle::default();
        p.op(&[0x80, 2])
            .global("os", "system")
            .string("echo pwned")
            .op(b"\x85R.");
        bytes.extend_from_slice(&p.0);
        let err = read_legacy_state_dict(&bytes).unwrap_err();
        assert!(matches!(err, PthError::ForbiddenGlobal { .. }), "{err}");
        assert!(err.to_string().contains("os.system"), "{err}");
    }

    #[test]
    fn rejects_unknown_opcode_by_name() {
        let mut bytes = header();
        // INST ('i') builds an arbitrary class instance: never allowed.
        bytes.extend_from_slice(b"\x80\x02ibuiltins\neval\n.");
        let err = read_legacy_state_dict(&bytes).unwrap_err();
        assert!(
            matches!(err, PthError::ForbiddenOpcode { opcode: b'i', .. }),
            "{err}"
        );
    }

    #[test]
    fn rejects_view_past_storage_end() {
        let mut bytes = tiny_file();
        // Shrink the float storage's declared length: the view no longer fits.
        let pos = bytes.len() - 8 - 8 - 7 * 4 - 8;
        bytes[pos..pos + 8].copy_from_slice(&6u64.to_le_bytes());
        bytes.drain(pos + 8..pos + 12);
        let err = read_legacy_state_dict(&bytes).unwrap_err();
        assert!(err.to_string().contains("w.T"), "{err}");
    }

    #[test]
    fn truncated_storage_is_an_error() {
        let bytes = tiny_file();
        let err = read_legacy_state_dict(&bytes[..bytes.len() - 3]).unwrap_err();
        assert!(matches!(err, PthError::Truncated { .. }), "{err}");
    }

    #[test]
    fn deep_nesting_is_refused_before_it_can_overflow_the_stack() {
        let mut bytes = header();
        // A list inside 100,000 one-element tuples (TUPLE1 wraps the top).
        bytes.extend_from_slice(&[0x80, 2, b']']);
        bytes.extend(std::iter::repeat_n(0x85, 100_000));
        bytes.push(b'.');
        let err = read_legacy_state_dict(&bytes).unwrap_err();
        assert!(matches!(err, PthError::TooLarge { .. }), "{err}");
        assert!(err.to_string().contains("nested deeper than 32"), "{err}");
    }

    #[test]
    fn memo_copies_count_against_the_value_budget() {
        let mut bytes = header();
        bytes.extend_from_slice(&[0x80, 2, b'N', b'q', 0]);
        for _ in 0..30 {
            bytes.extend_from_slice(&[b'h', 0, b'h', 0, 0x86, b'q', 0]);
        }
        bytes.push(b'.');
        let err = read_legacy_state_dict(&bytes).unwrap_err();
        assert!(err.to_string().contains("memo copies included"), "{err}");
    }

    #[test]
    fn a_size_whose_byte_count_overflows_is_an_error() {
        let view = TensorView {
            storage_key: "k".into(),
            storage_type: StorageType::Float,
            offset: 0,
            shape: vec![usize::MAX / 2, 3],
            stride: vec![0, 0],
        };
        let err = view_bytes("big", &view).unwrap_err();
        assert!(err.to_string().contains("overflows"), "{err}");
    }
}
