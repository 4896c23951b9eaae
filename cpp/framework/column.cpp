#include "framework/column.hpp"

namespace fw {

static_assert(sizeof(bool) == 1, "DType::Bool columns share their bytes with numpy bool arrays");

size_t dtype_size(DType t) {
  switch (t) {
    case DType::U8: case DType::I8: case DType::Bool: return 1;
    case DType::U16: case DType::I16: return 2;
    case DType::U32: case DType::I32: case DType::F32: return 4;
    default: return 8;
  }
}

const char* dtype_name(DType t) {
  static const char* names[] = {"uint8", "uint16", "uint32", "uint64", "int8",
                                "int16", "int32",  "int64",  "float32", "float64", "bool"};
  return names[static_cast<int>(t)];
}

Column::Column(DType dtype, std::vector<int64_t> inner_shape, size_t rows)
    : dtype_(dtype), inner_(std::move(inner_shape)) {
  width_ = 1;
  for (auto d : inner_) width_ *= static_cast<size_t>(d);
  resize(rows);
}

void Column::detach() {
  if (buf_.use_count() > 1) buf_ = std::make_shared<Buffer>(*buf_);
}

void Column::resize(size_t rows) {
  detach();
  buf_->resize(rows * row_bytes(), 0);
  rows_ = rows;
}

void Column::reserve(size_t rows) {
  detach();
  buf_->reserve(rows * row_bytes());
}

void Column::append_rows(const Column& other, size_t begin, size_t end) {
  if (other.dtype_ != dtype_ || other.width_ != width_)
    throw std::logic_error("append_rows: columns differ in dtype or shape");
  if (end <= begin) return;
  append_bytes(other.raw() + begin * row_bytes(), end - begin);
}

void Column::append_bytes(const void* src, size_t n_rows) {
  const size_t old = rows_;
  resize(rows_ + n_rows);
  std::memcpy(buf_->data() + old * row_bytes(), src, n_rows * row_bytes());
}

}  // namespace fw
