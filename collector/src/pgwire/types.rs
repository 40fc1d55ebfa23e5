//! Arrow types as PostgreSQL types: OIDs, RowDescription, DataRow values in text and binary format, and
//! parameters from the client.
//!
//! Timestamps (any unit, any zone) are `timestamptz` in UTC at microsecond precision (PostgreSQL's; nanoseconds
//! are truncated toward the past). `UInt64` is `numeric`, since it may exceed `int8`. Types without a PostgreSQL
//! counterpart here are sent as `text` in Arrow's display form.

use std::sync::Arc;

use arrow::array::{Array, ArrayRef, AsArray};
use arrow::datatypes::{
    DataType, Date32Type, Float16Type, Float32Type, Float64Type, Int8Type, Int16Type, Int32Type,
    Int64Type, Schema, TimeUnit, TimestampMicrosecondType, TimestampMillisecondType,
    TimestampNanosecondType, TimestampSecondType, UInt8Type, UInt16Type, UInt32Type, UInt64Type,
};
use arrow::record_batch::RecordBatch;
use arrow::util::display::{ArrayFormatter, FormatOptions};
use datafusion::common::ScalarValue;

use super::{PgError, message};

pub const BOOL: i32 = 16;
pub const INT8: i32 = 20;
pub const INT2: i32 = 21;
pub const INT4: i32 = 23;
pub const TEXT: i32 = 25;
pub const FLOAT4: i32 = 700;
pub const FLOAT8: i32 = 701;
pub const VARCHAR: i32 = 1043;
pub const DATE: i32 = 1082;
pub const TIMESTAMP: i32 = 1114;
pub const TIMESTAMPTZ: i32 = 1184;
pub const NUMERIC: i32 = 1700;
const NAME: i32 = 19;
const UNKNOWN: i32 = 705;

/// Microseconds from the Unix epoch to PostgreSQL's (2000-01-01).
const PG_EPOCH_MICROS: i64 = 946_684_800_000_000;
/// Days from 1970-01-01 to 2000-01-01.
const PG_EPOCH_DAYS: i32 = 10_957;

/// The PostgreSQL type of an Arrow type.
pub fn oid(t: &DataType) -> i32 {
    match t {
        DataType::Boolean => BOOL,
        DataType::Int8 | DataType::Int16 | DataType::UInt8 => INT2,
        DataType::Int32 | DataType::UInt16 => INT4,
        DataType::Int64 | DataType::UInt32 => INT8,
        DataType::UInt64 => NUMERIC,
        DataType::Float16 | DataType::Float32 => FLOAT4,
        DataType::Float64 => FLOAT8,
        DataType::Timestamp(..) => TIMESTAMPTZ,
        DataType::Date32 => DATE,
        DataType::Dictionary(_, value) => oid(value),
        _ => TEXT,
    }
}

/// The name `format_type` gives the type (for `\d`).
pub fn type_name(t: &DataType) -> &'static str {
    match oid(t) {
        BOOL => "boolean",
        INT2 => "smallint",
        INT4 => "integer",
        INT8 => "bigint",
        NUMERIC => "numeric",
        FLOAT4 => "real",
        FLOAT8 => "double precision",
        TIMESTAMPTZ => "timestamp with time zone",
        DATE => "date",
        _ => "text",
    }
}

fn type_len(oid: i32) -> i16 {
    match oid {
        BOOL => 1,
        INT2 => 2,
        INT4 | FLOAT4 | DATE => 4,
        INT8 | FLOAT8 | TIMESTAMPTZ => 8,
        _ => -1,
    }
}

pub fn row_description(out: &mut Vec<u8>, schema: &Schema, formats: &[i16]) {
    message(out, b'T', |b| {
        b.extend(
            i16::try_from(schema.fields().len())
                .unwrap_or(i16::MAX)
                .to_be_bytes(),
        );
        for (field, format) in schema.fields().iter().zip(formats) {
            let oid = oid(field.data_type());
            super::cstr(b, field.name());
            b.extend(0i32.to_be_bytes()); // table oid
            b.extend(0i16.to_be_bytes()); // column number
            b.extend(oid.to_be_bytes());
            b.extend(type_len(oid).to_be_bytes());
            b.extend((-1i32).to_be_bytes()); // type modifier
            b.extend(format.to_be_bytes());
        }
    });
}

/// Strings of every kind become plain `Utf8` (dictionaries decoded) so one encoder serves them all.
fn normalize(array: &ArrayRef) -> Result<ArrayRef, PgError> {
    let decode = match array.data_type() {
        DataType::Dictionary(_, value) => Some((**value).clone()),
        DataType::LargeUtf8 | DataType::Utf8View => Some(DataType::Utf8),
        _ => None,
    };
    match decode {
        Some(t) => arrow::compute::cast(array, &t)
            .map_err(|e| PgError::new("XX000", format!("cannot decode a column: {e}"))),
        None => Ok(Arc::clone(array)),
    }
}

/// Appends one DataRow per row of `batch`.
pub fn data_rows(out: &mut Vec<u8>, batch: &RecordBatch, formats: &[i16]) -> Result<(), PgError> {
    let columns = batch
        .columns()
        .iter()
        .map(normalize)
        .collect::<Result<Vec<_>, _>>()?;
    let options = FormatOptions::default().with_null("");
    let formatters = columns
        .iter()
        .map(|c| ArrayFormatter::try_new(c.as_ref(), &options))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| PgError::new("XX000", format!("cannot format a column: {e}")))?;
    let mut value = Vec::new();
    for row in 0..batch.num_rows() {
        message(out, b'D', |b| {
            b.extend(
                i16::try_from(columns.len())
                    .unwrap_or(i16::MAX)
                    .to_be_bytes(),
            );
            for (i, column) in columns.iter().enumerate() {
                if column.is_null(row) {
                    b.extend((-1i32).to_be_bytes());
                    continue;
                }
                value.clear();
                let binary = formats.get(i) == Some(&1);
                encode(column, row, binary, &formatters[i], &mut value);
                b.extend(i32::try_from(value.len()).unwrap_or(i32::MAX).to_be_bytes());
                b.extend(&value);
            }
        });
    }
    Ok(())
}

/// One non-null value in the format of the column's PostgreSQL type (see [`oid`]).
fn encode(
    column: &ArrayRef,
    row: usize,
    binary: bool,
    fallback: &ArrayFormatter,
    out: &mut Vec<u8>,
) {
    use std::io::Write;
    macro_rules! int {
        ($arrow:ty, $pg:ty) => {{
            let v = column.as_primitive::<$arrow>().value(row);
            if binary {
                out.extend(<$pg>::from(v).to_be_bytes());
            } else {
                let _ = write!(out, "{v}");
            }
        }};
    }
    match column.data_type() {
        DataType::Boolean => {
            let v = column.as_boolean().value(row);
            if binary {
                out.push(u8::from(v));
            } else {
                out.push(if v { b't' } else { b'f' });
            }
        }
        DataType::Int8 => int!(Int8Type, i16),
        DataType::Int16 => int!(Int16Type, i16),
        DataType::UInt8 => int!(UInt8Type, i16),
        DataType::Int32 => int!(Int32Type, i32),
        DataType::UInt16 => int!(UInt16Type, i32),
        DataType::Int64 => int!(Int64Type, i64),
        DataType::UInt32 => int!(UInt32Type, i64),
        DataType::UInt64 => {
            let v = column.as_primitive::<UInt64Type>().value(row);
            if binary {
                numeric_binary(v, out);
            } else {
                let _ = write!(out, "{v}");
            }
        }
        DataType::Float16 => float4(
            column.as_primitive::<Float16Type>().value(row).to_f32(),
            binary,
            out,
        ),
        DataType::Float32 => float4(column.as_primitive::<Float32Type>().value(row), binary, out),
        DataType::Float64 => {
            let v = column.as_primitive::<Float64Type>().value(row);
            if binary {
                out.extend(v.to_bits().to_be_bytes());
            } else {
                float_text(v, 15, out);
            }
        }
        DataType::Timestamp(unit, _) => {
            let micros = match unit {
                TimeUnit::Second => column
                    .as_primitive::<TimestampSecondType>()
                    .value(row)
                    .saturating_mul(1_000_000),
                TimeUnit::Millisecond => column
                    .as_primitive::<TimestampMillisecondType>()
                    .value(row)
                    .saturating_mul(1_000),
                TimeUnit::Microsecond => {
                    column.as_primitive::<TimestampMicrosecondType>().value(row)
                }
                TimeUnit::Nanosecond => column
                    .as_primitive::<TimestampNanosecondType>()
                    .value(row)
                    .div_euclid(1_000),
            };
            if binary {
                out.extend(micros.saturating_sub(PG_EPOCH_MICROS).to_be_bytes());
            } else {
                timestamptz_text(micros, out);
            }
        }
        DataType::Date32 => {
            let days = column.as_primitive::<Date32Type>().value(row);
            if binary {
                out.extend(days.saturating_sub(PG_EPOCH_DAYS).to_be_bytes());
            } else {
                let _ = write!(out, "{}", fallback.value(row));
            }
        }
        DataType::Utf8 => out.extend(column.as_string::<i32>().value(row).as_bytes()),
        // Everything else is `text` (see `oid`): Arrow's display form, the same in both formats.
        _ => {
            let _ = write!(out, "{}", fallback.value(row));
        }
    }
}

fn float4(v: f32, binary: bool, out: &mut Vec<u8>) {
    if binary {
        out.extend(v.to_bits().to_be_bytes());
    } else {
        // The f32's own shortest digits, not those of its f64 widening (0.1f32 is not 0.1f64).
        match v.to_string().parse::<f64>() {
            Ok(shortest) => float_text(shortest, 6, out),
            Err(_) => float_text(f64::from(v), 6, out),
        }
    }
}

/// PostgreSQL's output: the shortest digits that read back exactly, in exponent form (`1e+20`, `1.5e-05`) when
/// the decimal exponent is below -4 or at least `digits` (15 for `float8`, 6 for `float4`); `NaN`, `Infinity`.
fn float_text(v: f64, digits: i32, out: &mut Vec<u8>) {
    use std::io::Write;
    if v.is_nan() {
        out.extend(b"NaN");
        return;
    }
    if v.is_infinite() {
        out.extend(if v > 0.0 {
            &b"Infinity"[..]
        } else {
            &b"-Infinity"[..]
        });
        return;
    }
    let scientific = format!("{v:e}");
    let (mantissa, exponent) = scientific.split_once('e').unwrap_or((&scientific, "0"));
    let exponent: i32 = exponent.parse().unwrap_or(0);
    if v != 0.0 && (exponent < -4 || exponent >= digits) {
        let sign = if exponent < 0 { '-' } else { '+' };
        let _ = write!(out, "{mantissa}e{sign}{:02}", exponent.abs());
    } else {
        let _ = write!(out, "{v}");
    }
}

/// `2026-11-26 03:00:00.123456+00`: PostgreSQL's ISO output in UTC, trailing zeros of the fraction dropped.
fn timestamptz_text(micros: i64, out: &mut Vec<u8>) {
    use std::io::Write;
    let Some(t) = chrono::DateTime::from_timestamp_micros(micros) else {
        out.extend(b"infinity");
        return;
    };
    let _ = write!(out, "{}", t.format("%Y-%m-%d %H:%M:%S"));
    let fraction = micros.rem_euclid(1_000_000);
    if fraction != 0 {
        let digits = format!("{fraction:06}");
        let _ = write!(out, ".{}", digits.trim_end_matches('0'));
    }
    out.extend(b"+00");
}

/// `numeric` in binary: base-10000 digits, most significant first, trailing zero digits dropped.
fn numeric_binary(v: u64, out: &mut Vec<u8>) {
    let mut digits = Vec::new();
    let mut rest = v;
    while rest > 0 {
        digits.push(i16::try_from(rest % 10_000).unwrap_or(0));
        rest /= 10_000;
    }
    digits.reverse();
    let weight = i16::try_from(digits.len()).unwrap_or(0) - 1;
    while digits.last() == Some(&0) {
        digits.pop();
    }
    out.extend(i16::try_from(digits.len()).unwrap_or(0).to_be_bytes());
    out.extend(weight.max(0).to_be_bytes());
    out.extend(0i16.to_be_bytes()); // sign: positive
    out.extend(0i16.to_be_bytes()); // display scale
    for d in digits {
        out.extend(d.to_be_bytes());
    }
}

/// A parameter from Bind as a value for the engine, converted to the type the plan expects (`target`).
pub fn decode_param(
    value: Option<&[u8]>,
    oid: i32,
    binary: bool,
    target: Option<&DataType>,
) -> Result<ScalarValue, PgError> {
    let Some(bytes) = value else {
        return Ok(match target {
            Some(t) => ScalarValue::try_from(t).unwrap_or(ScalarValue::Null),
            None => ScalarValue::Null,
        });
    };
    let invalid = |what: &str| PgError::new("22P02", format!("invalid {what} parameter value"));
    let value = if binary {
        let fixed = |n: usize| -> Result<&[u8], PgError> {
            if bytes.len() == n {
                Ok(bytes)
            } else {
                Err(PgError::new(
                    "22P03",
                    format!(
                        "binary parameter of type {oid} must be {n} bytes, got {}",
                        bytes.len()
                    ),
                ))
            }
        };
        match oid {
            BOOL => ScalarValue::Boolean(Some(fixed(1)?[0] != 0)),
            INT2 => {
                let b = fixed(2)?;
                ScalarValue::Int64(Some(i64::from(i16::from_be_bytes([b[0], b[1]]))))
            }
            INT4 => {
                let b = fixed(4)?;
                ScalarValue::Int64(Some(i64::from(i32::from_be_bytes([
                    b[0], b[1], b[2], b[3],
                ]))))
            }
            INT8 => ScalarValue::Int64(Some(i64::from_be_bytes(array8(fixed(8)?)))),
            FLOAT4 => {
                let b = fixed(4)?;
                ScalarValue::Float64(Some(f64::from(f32::from_be_bytes([
                    b[0], b[1], b[2], b[3],
                ]))))
            }
            FLOAT8 => ScalarValue::Float64(Some(f64::from_be_bytes(array8(fixed(8)?)))),
            TIMESTAMP | TIMESTAMPTZ => {
                let micros = i64::from_be_bytes(array8(fixed(8)?));
                ScalarValue::TimestampMicrosecond(
                    Some(micros.saturating_add(PG_EPOCH_MICROS)),
                    Some("UTC".into()),
                )
            }
            DATE => {
                let b = fixed(4)?;
                ScalarValue::Date32(Some(
                    i32::from_be_bytes([b[0], b[1], b[2], b[3]]).saturating_add(PG_EPOCH_DAYS),
                ))
            }
            TEXT | VARCHAR | NAME | UNKNOWN => ScalarValue::Utf8(Some(
                std::str::from_utf8(bytes)
                    .map_err(|_| invalid("UTF-8"))?
                    .to_owned(),
            )),
            other => {
                return Err(PgError::new(
                    "0A000",
                    format!(
                        "binary parameters of type {other} are not supported; send them as text"
                    ),
                ));
            }
        }
    } else {
        let text = std::str::from_utf8(bytes).map_err(|_| invalid("UTF-8"))?;
        match oid {
            BOOL => ScalarValue::Boolean(Some(match text.trim().to_ascii_lowercase().as_str() {
                "t" | "true" | "1" | "on" | "yes" | "y" => true,
                "f" | "false" | "0" | "off" | "no" | "n" => false,
                _ => return Err(invalid("boolean")),
            })),
            INT2 | INT4 | INT8 => {
                ScalarValue::Int64(Some(text.trim().parse().map_err(|_| invalid("integer"))?))
            }
            FLOAT4 | FLOAT8 => {
                ScalarValue::Float64(Some(parse_float(text).ok_or_else(|| invalid("float"))?))
            }
            _ => ScalarValue::Utf8(Some(text.to_owned())),
        }
    };
    match target {
        Some(t) if value.data_type() != *t => value.cast_to(t).map_err(|e| {
            PgError::new(
                "22P02",
                format!("parameter value {value} is not a valid {t}: {e}"),
            )
        }),
        _ => Ok(value),
    }
}

fn parse_float(text: &str) -> Option<f64> {
    match text.trim().to_ascii_lowercase().as_str() {
        "nan" => Some(f64::NAN),
        "infinity" | "inf" => Some(f64::INFINITY),
        "-infinity" | "-inf" => Some(f64::NEG_INFINITY),
        t => t.parse().ok(),
    }
}

fn array8(b: &[u8]) -> [u8; 8] {
    let mut a = [0; 8];
    a.copy_from_slice(&b[..8]);
    a
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_read_like_postgres() {
        let mut out = Vec::new();
        timestamptz_text(1_700_000_000_123_456, &mut out);
        assert_eq!(
            String::from_utf8_lossy(&out),
            "2023-11-14 22:13:20.123456+00"
        );
        out.clear();
        timestamptz_text(1_700_000_000_500_000, &mut out);
        assert_eq!(String::from_utf8_lossy(&out), "2023-11-14 22:13:20.5+00");
        out.clear();
        timestamptz_text(1_700_000_000_000_000, &mut out);
        assert_eq!(String::from_utf8_lossy(&out), "2023-11-14 22:13:20+00");
    }

    #[test]
    fn floats_read_like_postgres() {
        let text = |v: f64, digits| {
            let mut out = Vec::new();
            float_text(v, digits, &mut out);
            String::from_utf8(out).unwrap_or_default()
        };
        assert_eq!(text(1.5, 15), "1.5");
        assert_eq!(text(1e20, 15), "1e+20");
        assert_eq!(text(123456789012345.0, 15), "123456789012345");
        assert_eq!(text(1234567890123456.0, 15), "1.234567890123456e+15");
        assert_eq!(text(0.000015, 15), "1.5e-05");
        assert_eq!(text(0.0001, 15), "0.0001");
        assert_eq!(text(0.0, 15), "0");
        assert_eq!(text(-2.5e-300, 15), "-2.5e-300");
        assert_eq!(text(f64::NEG_INFINITY, 15), "-Infinity");
        let mut out = Vec::new();
        float4(0.1, false, &mut out);
        assert_eq!(out, b"0.1");
    }

    #[test]
    fn numeric_binary_digits() {
        let mut out = Vec::new();
        numeric_binary(1_0000_0002, &mut out);
        // ndigits 3, weight 2, sign 0, dscale 0, digits 1 0 2
        assert_eq!(out, [0, 3, 0, 2, 0, 0, 0, 0, 0, 1, 0, 0, 0, 2]);
        out.clear();
        numeric_binary(0, &mut out);
        assert_eq!(out, [0, 0, 0, 0, 0, 0, 0, 0]);
        out.clear();
        numeric_binary(20_000, &mut out);
        assert_eq!(out, [0, 1, 0, 1, 0, 0, 0, 0, 0, 2]);
    }

    #[test]
    fn params_convert_to_the_planned_type() {
        let v = decode_param(Some(b"2.5"), TEXT, false, Some(&DataType::Float64))
            .unwrap_or(ScalarValue::Null);
        assert_eq!(v, ScalarValue::Float64(Some(2.5)));
        let v = decode_param(
            Some(&7i64.to_be_bytes()),
            INT8,
            true,
            Some(&DataType::Float64),
        )
        .unwrap_or(ScalarValue::Null);
        assert_eq!(v, ScalarValue::Float64(Some(7.0)));
        assert!(decode_param(Some(b"x"), INT8, false, None).is_err());
        assert!(decode_param(Some(&[1, 2]), INT8, true, None).is_err());
    }
}
