#include "framework/parameters.hpp"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <sstream>

namespace fw {

const char* param_type_name(ParamType t) {
  switch (t) {
    case ParamType::Bool: return "bool";
    case ParamType::Int: return "int";
    case ParamType::Float: return "float";
    case ParamType::Str: return "str";
    case ParamType::FloatList: return "list[float]";
    case ParamType::IntList: return "list[int]";
    case ParamType::StrList: return "list[str]";
  }
  return "?";
}

namespace {
// As Python's repr: the shortest text that reads back to the same double, with ".0" on a whole number
// (a stream's 6 significant digits showed 1.23456789 as 1.23457 and 1.0 as 1, an int's look), and, as
// repr, positional for decimal exponents -4..15 (%g's shortest wrote 50.0 as 5e+01).
std::string float_repr(double x) {
  char buf[40];
  int precision = 1;
  for (; precision <= 17; ++precision) {
    std::snprintf(buf, sizeof buf, "%.*e", precision - 1, x);
    if (std::strtod(buf, nullptr) == x) break;
  }
  if (std::isfinite(x) && x != 0) {
    const int exponent = std::atoi(std::strchr(buf, 'e') + 1);  // of the shortest digits, as rounded
    // beyond, buf's shortest scientific form is repr's (no ".0", no trailing zeros in the mantissa)
    if (exponent >= -4 && exponent < 16)
      std::snprintf(buf, sizeof buf, "%.*f", std::max(0, precision - 1 - exponent), x);
  } else {
    std::snprintf(buf, sizeof buf, "%g", x);  // 0, -0, nan, inf
  }
  std::string s = buf;
  if (s.find_first_of(".eni") == std::string::npos) s += ".0";  // (not 1e+20, nan, inf)
  return s;
}
}  // namespace

std::string format_param_value(const ParamValue& v) {
  std::ostringstream os;
  std::visit(
      [&](const auto& x) {
        using X = std::decay_t<decltype(x)>;
        if constexpr (std::is_same_v<X, bool>) os << (x ? "True" : "False");
        else if constexpr (std::is_same_v<X, std::string>) os << '\'' << x << '\'';
        else if constexpr (std::is_same_v<X, int64_t>) os << x;
        else if constexpr (std::is_same_v<X, double>) os << float_repr(x);
        else {
          os << '[';
          for (size_t i = 0; i < x.size(); ++i) {
            if (i) os << ", ";
            if constexpr (std::is_same_v<X, std::vector<std::string>>) os << '\'' << x[i] << '\'';
            else if constexpr (std::is_same_v<X, std::vector<double>>) os << float_repr(x[i]);
            else os << x[i];
          }
          os << ']';
        }
      },
      v);
  return os.str();
}

void Parameters::declare(const std::string& name, ParamType type, std::optional<ParamValue> default_value,
                         const std::string& description, std::function<void(const ParamValue&)> store) {
  if (find(name)) throw std::logic_error(owner_ + ": parameter '" + name + "' declared twice");
  if (default_value) default_value = checked(name, type, std::move(*default_value));
  Parameter p{name, type, default_value, description, default_value.value_or(ParamValue{}), false,
              std::move(store)};
  params_.push_back(std::move(p));
}

const Parameter* Parameters::find(const std::string& name) const {
  for (const auto& p : params_)
    if (p.name == name) return &p;
  return nullptr;
}

// A misspelt name: the message lists the names the module takes (as `eclreco modules NAME` does).
ParameterError Parameters::unknown(const std::string& name) const {
  std::string known;
  for (const auto& q : params_) known += (known.empty() ? "" : ", ") + q.name;
  return ParameterError(owner_ + ": unknown parameter '" + name + "' (parameters: " + (known.empty() ? "none" : known) +
                        ")");
}

const Parameter& Parameters::get(const std::string& name) const {
  const Parameter* p = find(name);
  if (!p) throw unknown(name);
  return *p;
}

static bool matches(ParamType t, const ParamValue& v) {
  switch (t) {
    case ParamType::Bool: return std::holds_alternative<bool>(v);
    case ParamType::Int: return std::holds_alternative<int64_t>(v);
    case ParamType::Float: return std::holds_alternative<double>(v);
    case ParamType::Str: return std::holds_alternative<std::string>(v);
    case ParamType::FloatList: return std::holds_alternative<std::vector<double>>(v);
    case ParamType::IntList: return std::holds_alternative<std::vector<int64_t>>(v);
    case ParamType::StrList: return std::holds_alternative<std::vector<std::string>>(v);
  }
  return false;
}

// The value as the parameter's type holds it (an int is a valid float, and a list of ints a valid
// list of floats, never the reverse); ParameterError for another type or a non-finite number.
ParamValue Parameters::checked(const std::string& name, ParamType type, ParamValue value) const {
  if (type == ParamType::Float && std::holds_alternative<int64_t>(value))
    value = static_cast<double>(std::get<int64_t>(value));
  if (type == ParamType::FloatList && std::holds_alternative<std::vector<int64_t>>(value)) {
    const auto& iv = std::get<std::vector<int64_t>>(value);
    value = std::vector<double>(iv.begin(), iv.end());
  }
  if (!matches(type, value))
    throw ParameterError(owner_ + ": parameter '" + name + "' must be " + param_type_name(type));
  // NaN is no setting of anything (every comparison with it is false: a threshold would pass all), and
  // an infinite time or energy overflows the conversions after it (a poll timeout in ms, a bin index)
  auto non_finite = [](double x) { return !std::isfinite(x); };
  if ((std::holds_alternative<double>(value) && non_finite(std::get<double>(value))) ||
      (std::holds_alternative<std::vector<double>>(value) &&
       std::any_of(std::get<std::vector<double>>(value).begin(), std::get<std::vector<double>>(value).end(),
                   non_finite)))
    throw ParameterError(owner_ + ": parameter '" + name + "' must be a finite number, not NaN or inf");
  return value;
}

void Parameters::set(const std::string& name, ParamValue value) {
  Parameter* p = const_cast<Parameter*>(find(name));
  if (!p) throw unknown(name);
  value = checked(name, p->type, std::move(value));
  if (p->store) {
    try {
      p->store(value);
    } catch (const std::out_of_range& e) {
      throw ParameterError(owner_ + ": parameter '" + name + "' = " + e.what());
    }
  }
  p->value = std::move(value);
  p->is_set = true;
}

const ParamValue& Parameters::value(const std::string& name) const {
  const Parameter& p = get(name);
  if (!p.default_value && !p.is_set) throw ParameterError(owner_ + ": required parameter '" + name + "' is not set");
  return p.value;
}

void Parameters::check_required() const {
  for (const auto& p : params_)
    if (!p.default_value && !p.is_set)
      throw ParameterError(owner_ + ": required parameter '" + p.name + "' is not set");
}

}  // namespace fw
