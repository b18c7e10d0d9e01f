//! Tables that query reports render as aligned text (people) or CSV (tools).

use serde::Serialize;

/// One table cell. Text renders numbers with four decimals; CSV keeps full precision.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum Cell {
    Text(String),
    Integer(i64),
    Number(f64),
    /// A standard deviation shown after a mean: `± 0.0123` in text.
    PlusMinus(f64),
    /// A difference, signed in text: `+0.0500`.
    Difference(f64),
    Missing,
}

impl Cell {
    pub fn text(value: impl Into<String>) -> Self {
        Cell::Text(value.into())
    }

    pub(crate) fn is_numeric(&self) -> bool {
        matches!(
            self,
            Cell::Integer(_) | Cell::Number(_) | Cell::PlusMinus(_)
        )
    }

    /// The cell as the text tables show it.
    pub(crate) fn for_text(&self) -> String {
        match self {
            Cell::Text(text) => text.clone(),
            Cell::Integer(value) => value.to_string(),
            Cell::Number(value) => format_number(*value),
            Cell::PlusMinus(value) => format!("± {}", format_number(*value)),
            Cell::Difference(value) if *value >= 0.0 => format!("+{}", format_number(*value)),
            Cell::Difference(value) => format_number(*value),
            Cell::Missing => "-".to_string(),
        }
    }

    /// The cell as CSV writes it (full precision; empty when missing).
    pub(crate) fn for_csv(&self) -> String {
        match self {
            Cell::Text(text) => text.clone(),
            Cell::Integer(value) => value.to_string(),
            Cell::Number(value) | Cell::PlusMinus(value) | Cell::Difference(value) => {
                format!("{value}")
            }
            Cell::Missing => String::new(),
        }
    }
}

/// Four decimals for ordinary magnitudes; scientific notation for tiny or huge ones.
pub(crate) fn format_number(value: f64) -> String {
    let magnitude = value.abs();
    if value == 0.0 || (1e-3..1e6).contains(&magnitude) {
        format!("{value:.4}")
    } else {
        format!("{value:.3e}")
    }
}

/// Headers and rows of cells.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Table {
    pub headers: Vec<String>,
    pub rows: Vec<Vec<Cell>>,
}

impl Table {
    pub fn new(headers: impl IntoIterator<Item = impl Into<String>>) -> Self {
        Self {
            headers: headers.into_iter().map(Into::into).collect(),
            rows: Vec::new(),
        }
    }

    pub fn push(&mut self, row: Vec<Cell>) {
        debug_assert_eq!(row.len(), self.headers.len(), "row width");
        self.rows.push(row);
    }

    /// Columns padded to their widest cell; numbers right-aligned.
    pub fn to_text(&self) -> String {
        let rendered: Vec<Vec<String>> = self
            .rows
            .iter()
            .map(|row| row.iter().map(Cell::for_text).collect())
            .collect();
        let mut widths: Vec<usize> = self.headers.iter().map(|h| h.chars().count()).collect();
        for row in &rendered {
            for (width, cell) in widths.iter_mut().zip(row) {
                *width = (*width).max(cell.chars().count());
            }
        }
        let numeric: Vec<bool> = (0..self.headers.len())
            .map(|column| {
                !self.rows.is_empty()
                    && self
                        .rows
                        .iter()
                        .all(|row| row[column].is_numeric() || row[column] == Cell::Missing)
            })
            .collect();
        let line = |cells: &[String]| {
            let padded: Vec<String> = cells
                .iter()
                .enumerate()
                .map(|(column, cell)| {
                    let pad = widths[column].saturating_sub(cell.chars().count());
                    if numeric[column] {
                        format!("{}{cell}", " ".repeat(pad))
                    } else {
                        format!("{cell}{}", " ".repeat(pad))
                    }
                })
                .collect();
            padded.join("  ").trim_end().to_string()
        };
        let mut out = line(&self.headers);
        out.push('\n');
        let rule: Vec<String> = widths.iter().map(|w| "-".repeat(*w)).collect();
        out.push_str(&rule.join("  "));
        out.push('\n');
        for row in &rendered {
            out.push_str(&line(row));
            out.push('\n');
        }
        out
    }

    /// RFC 4180 CSV with a header row.
    pub fn to_csv(&self) -> String {
        let mut writer = csv::Writer::from_writer(Vec::new());
        let write = |writer: &mut csv::Writer<Vec<u8>>| -> csv::Result<()> {
            writer.write_record(&self.headers)?;
            for row in &self.rows {
                writer.write_record(row.iter().map(Cell::for_csv))?;
            }
            writer.flush()?;
            Ok(())
        };
        write(&mut writer).expect("writing CSV into memory cannot fail");
        String::from_utf8(writer.into_inner().expect("in-memory CSV flushes"))
            .expect("CSV of UTF-8 cells is UTF-8")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Table {
        let mut table = Table::new(["head", "n", "mean", "std"]);
        table.push(vec![
            Cell::text("linear"),
            Cell::Integer(3),
            Cell::Number(0.8125),
            Cell::PlusMinus(0.01),
        ]);
        table.push(vec![
            Cell::text("mlp, wide"),
            Cell::Integer(1),
            Cell::Number(0.9),
            Cell::Missing,
        ]);
        table
    }

    #[test]
    fn text_aligns_columns_and_right_aligns_numbers() {
        let text = sample().to_text();
        assert_eq!(
            text,
            "head       n    mean       std\n\
             ---------  -  ------  --------\n\
             linear     3  0.8125  ± 0.0100\n\
             mlp, wide  1  0.9000         -\n"
        );
    }

    #[test]
    fn csv_keeps_full_precision_and_quotes() {
        assert_eq!(
            sample().to_csv(),
            "head,n,mean,std\nlinear,3,0.8125,0.01\n\"mlp, wide\",1,0.9,\n"
        );
    }

    #[test]
    fn tiny_numbers_use_scientific_notation() {
        assert_eq!(format_number(0.00012), "1.200e-4");
        assert_eq!(format_number(0.5), "0.5000");
        assert_eq!(format_number(0.0), "0.0000");
    }
}
