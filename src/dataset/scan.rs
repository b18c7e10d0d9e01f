//! Scanning sources into manifests (being written).

use serde::{Deserialize, Serialize};

use super::{DatasetError, DatasetInfo, SplitConfig};
use crate::layout::Layout;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SourceFormat {
    ImageFolder,
    Manifest,
    LabelFile,
    Unlabeled,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LabelColumn {
    Number(usize),
    Name(String),
}

#[derive(Debug, Clone, Default)]
pub struct AddConfig {
    pub label_column: Option<LabelColumn>,
    pub split: SplitConfig,
}

pub fn add(
    _layout: &Layout,
    _name: &str,
    _source: &std::path::Path,
    _config: &AddConfig,
) -> Result<DatasetInfo, DatasetError> {
    Err(DatasetError::Config("not yet".into()))
}
