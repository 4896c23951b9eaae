// Typed, type-erased column storage: the unit of columnar event data. A column holds `rows`
// elements of an optional inner shape (e.g. 7x7 for cluster images) in one contiguous buffer
// that can be shared with Python (numpy views) without copying. Copy-on-write: a write-resize
// while the buffer is shared detaches first, so views never dangle.
#pragma once
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

namespace fw {

// Bool: one byte per value, 0 or 1 (numpy's bool): a mask a Python module computes stays a mask for the next
// one (as uint8 it would index rows 0 and 1 instead of selecting)
enum class DType : uint8_t { U8, U16, U32, U64, I8, I16, I32, I64, F32, F64, Bool };

size_t dtype_size(DType t);
const char* dtype_name(DType t);  // numpy-style: "uint8", "float32", "bool", ...

template <class T> constexpr DType dtype_of();
template <> constexpr DType dtype_of<uint8_t>() { return DType::U8; }
template <> constexpr DType dtype_of<uint16_t>() { return DType::U16; }
template <> constexpr DType dtype_of<uint32_t>() { return DType::U32; }
template <> constexpr DType dtype_of<uint64_t>() { return DType::U64; }
template <> constexpr DType dtype_of<int8_t>() { return DType::I8; }
template <> constexpr DType dtype_of<int16_t>() { return DType::I16; }
template <> constexpr DType dtype_of<int32_t>() { return DType::I32; }
template <> constexpr DType dtype_of<int64_t>() { return DType::I64; }
template <> constexpr DType dtype_of<float>() { return DType::F32; }
template <> constexpr DType dtype_of<double>() { return DType::F64; }
template <> constexpr DType dtype_of<bool>() { return DType::Bool; }

using Buffer = std::vector<unsigned char>;

class Column {
 public:
  Column() = default;
  explicit Column(DType dtype, std::vector<int64_t> inner_shape = {}, size_t rows = 0);
  template <class T>
  static Column of(size_t rows = 0, std::vector<int64_t> inner_shape = {}) {
    return Column(dtype_of<T>(), std::move(inner_shape), rows);
  }

  DType dtype() const { return dtype_; }
  void set_name(std::string name) { name_ = std::move(name); }
  size_t rows() const { return rows_; }
  const std::vector<int64_t>& inner_shape() const { return inner_; }
  size_t row_width() const { return width_; }  // elements per row
  size_t row_bytes() const { return width_ * dtype_size(dtype_); }
  size_t nbytes() const { return rows_ * row_bytes(); }

  void resize(size_t rows);   // new rows are zero
  void reserve(size_t rows);
  void clear() { resize(0); }

  template <class T>
  T* data() {
    check<T>();
    detach();
    return reinterpret_cast<T*>(buf_->data());
  }
  template <class T>
  const T* data() const {
    check<T>();
    return reinterpret_cast<const T*>(buf_ ? buf_->data() : nullptr);
  }
  // One value per row (a column of another shape would be read interleaved): std::logic_error
  // naming the column otherwise.
  template <class T>
  const T* values() const {
    check_one_per_row();
    return data<T>();
  }
  template <class T>
  T* values() {
    check_one_per_row();
    return data<T>();
  }
  template <class T>
  void push_back(T value) {
    check<T>();
    resize(rows_ + 1);
    reinterpret_cast<T*>(buf_->data())[(rows_ - 1) * width_] = value;
  }
  // Append rows [begin, end) of another column of the same dtype and inner shape.
  void append_rows(const Column& other, size_t begin, size_t end);
  void append_bytes(const void* src, size_t n_rows);

  // For zero-copy export: the buffer keeps the data alive as long as someone holds it.
  std::shared_ptr<Buffer> shared_buffer() const { return buf_; }
  const unsigned char* raw() const { return buf_ ? buf_->data() : nullptr; }
  unsigned char* raw_mut() {
    detach();
    return buf_->data();
  }

 private:
  template <class T>
  void check() const {
    if (dtype_of<T>() != dtype_)
      throw std::logic_error(label() + " holds " + dtype_name(dtype_) + ", accessed as " + dtype_name(dtype_of<T>()));
  }
  void check_one_per_row() const {
    if (width_ != 1)
      throw std::logic_error(label() + " holds rows of " + std::to_string(width_) +
                             " values, one value per row expected");
  }
  // how an error names the column
  std::string label() const { return name_.empty() ? std::string("column") : "column '" + name_ + "'"; }
  void detach();  // unshare the buffer before a write

  DType dtype_ = DType::U8;
  std::vector<int64_t> inner_;
  size_t width_ = 1;
  size_t rows_ = 0;
  std::shared_ptr<Buffer> buf_ = std::make_shared<Buffer>();
  std::string name_;  // set by the collection that holds it: named in dtype errors
};

}  // namespace fw
