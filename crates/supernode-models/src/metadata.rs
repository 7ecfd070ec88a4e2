//! Typed key/value metadata, as GGUF stores it (and as safetensors configs are lowered to).
//!
//! Getters return `Ok(None)` when a key is absent and an error when it is present with the
//! wrong type: a wrong type is a broken file, not a missing optional value.

use std::collections::BTreeMap;

use crate::{ModelError, Result};

/// One metadata value; arrays may nest.
#[derive(Clone, Debug, PartialEq)]
pub enum MetaValue {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    U64(u64),
    I64(i64),
    F32(f32),
    F64(f64),
    Bool(bool),
    String(String),
    Array(Vec<MetaValue>),
}

impl MetaValue {
    /// GGUF's name for the value type, for error messages.
    pub fn type_name(&self) -> &'static str {
        match self {
            MetaValue::U8(_) => "uint8",
            MetaValue::I8(_) => "int8",
            MetaValue::U16(_) => "uint16",
            MetaValue::I16(_) => "int16",
            MetaValue::U32(_) => "uint32",
            MetaValue::I32(_) => "int32",
            MetaValue::U64(_) => "uint64",
            MetaValue::I64(_) => "int64",
            MetaValue::F32(_) => "float32",
            MetaValue::F64(_) => "float64",
            MetaValue::Bool(_) => "bool",
            MetaValue::String(_) => "string",
            MetaValue::Array(_) => "array",
        }
    }

    /// The value as a signed integer, for any integer type that fits.
    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            MetaValue::U8(v) => Some(v.into()),
            MetaValue::I8(v) => Some(v.into()),
            MetaValue::U16(v) => Some(v.into()),
            MetaValue::I16(v) => Some(v.into()),
            MetaValue::U32(v) => Some(v.into()),
            MetaValue::I32(v) => Some(v.into()),
            MetaValue::U64(v) => i64::try_from(v).ok(),
            MetaValue::I64(v) => Some(v),
            _ => None,
        }
    }

    /// The value as a float, for float and integer types.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            MetaValue::F32(v) => Some(v.into()),
            MetaValue::F64(v) => Some(v),
            _ => self.as_i64().map(|v| v as f64),
        }
    }
}

/// Metadata of one model file, keyed by GGUF key names.
#[derive(Clone, Debug, Default)]
pub struct Metadata {
    pub entries: BTreeMap<String, MetaValue>,
}

impl Metadata {
    pub fn get(&self, key: &str) -> Option<&MetaValue> {
        self.entries.get(key)
    }

    fn wrong(key: &str, want: &str, got: &MetaValue) -> ModelError {
        ModelError::Metadata(format!(
            "key `{key}` should be {want} but is {}",
            got.type_name()
        ))
    }

    pub fn get_str(&self, key: &str) -> Result<Option<&str>> {
        match self.get(key) {
            None => Ok(None),
            Some(MetaValue::String(s)) => Ok(Some(s)),
            Some(v) => Err(Self::wrong(key, "a string", v)),
        }
    }

    pub fn get_bool(&self, key: &str) -> Result<Option<bool>> {
        match self.get(key) {
            None => Ok(None),
            Some(MetaValue::Bool(b)) => Ok(Some(*b)),
            Some(v) => Err(Self::wrong(key, "a bool", v)),
        }
    }

    /// A non-negative integer of any integer type.
    pub fn get_usize(&self, key: &str) -> Result<Option<usize>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_i64()
                .and_then(|i| usize::try_from(i).ok())
                .map(Some)
                .ok_or_else(|| Self::wrong(key, "a non-negative integer", v)),
        }
    }

    pub fn get_f64(&self, key: &str) -> Result<Option<f64>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_f64()
                .map(Some)
                .ok_or_else(|| Self::wrong(key, "a number", v)),
        }
    }

    pub fn get_array(&self, key: &str) -> Result<Option<&[MetaValue]>> {
        match self.get(key) {
            None => Ok(None),
            Some(MetaValue::Array(a)) => Ok(Some(a)),
            Some(v) => Err(Self::wrong(key, "an array", v)),
        }
    }

    /// An array of strings.
    pub fn get_str_array(&self, key: &str) -> Result<Option<Vec<&str>>> {
        let Some(arr) = self.get_array(key)? else {
            return Ok(None);
        };
        arr.iter()
            .map(|v| match v {
                MetaValue::String(s) => Ok(s.as_str()),
                v => Err(Self::wrong(key, "an array of strings", v)),
            })
            .collect::<Result<Vec<_>>>()
            .map(Some)
    }

    /// An array of numbers, as f32.
    pub fn get_f32_array(&self, key: &str) -> Result<Option<Vec<f32>>> {
        let Some(arr) = self.get_array(key)? else {
            return Ok(None);
        };
        arr.iter()
            .map(|v| {
                v.as_f64()
                    .map(|f| f as f32)
                    .ok_or_else(|| Self::wrong(key, "an array of numbers", v))
            })
            .collect::<Result<Vec<_>>>()
            .map(Some)
    }

    /// An array of integers, as i64.
    pub fn get_i64_array(&self, key: &str) -> Result<Option<Vec<i64>>> {
        let Some(arr) = self.get_array(key)? else {
            return Ok(None);
        };
        arr.iter()
            .map(|v| {
                v.as_i64()
                    .ok_or_else(|| Self::wrong(key, "an array of integers", v))
            })
            .collect::<Result<Vec<_>>>()
            .map(Some)
    }
}
