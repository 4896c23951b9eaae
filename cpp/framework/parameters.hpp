// Typed module parameters, declared once (name, type, default or required, description). The
// same declaration drives validation at add_module, `eclreco modules NAME`, and steering.
#pragma once
#include <cstdint>
#include <limits>
#include <stdexcept>
#include <type_traits>
#include <functional>
#include <optional>
#include <stdexcept>
#include <string>
#include <variant>
#include <vector>

namespace fw {

using ParamValue = std::variant<bool, int64_t, double, std::string, std::vector<double>,
                                std::vector<int64_t>, std::vector<std::string>>;
enum class ParamType { Bool, Int, Float, Str, FloatList, IntList, StrList };
const char* param_type_name(ParamType t);  // "bool", "int", "float", "str", "list[float]", ...
std::string format_param_value(const ParamValue& v);

struct ParameterError : std::invalid_argument {
  using std::invalid_argument::invalid_argument;
};

template <class T> struct ParamTraits;
template <> struct ParamTraits<bool> { static constexpr ParamType type = ParamType::Bool; using Stored = bool; };
template <> struct ParamTraits<int> { static constexpr ParamType type = ParamType::Int; using Stored = int64_t; };
template <> struct ParamTraits<int64_t> { static constexpr ParamType type = ParamType::Int; using Stored = int64_t; };
template <> struct ParamTraits<double> { static constexpr ParamType type = ParamType::Float; using Stored = double; };
template <> struct ParamTraits<std::string> { static constexpr ParamType type = ParamType::Str; using Stored = std::string; };
template <> struct ParamTraits<std::vector<double>> { static constexpr ParamType type = ParamType::FloatList; using Stored = std::vector<double>; };
template <> struct ParamTraits<std::vector<int64_t>> { static constexpr ParamType type = ParamType::IntList; using Stored = std::vector<int64_t>; };
template <> struct ParamTraits<std::vector<std::string>> { static constexpr ParamType type = ParamType::StrList; using Stored = std::vector<std::string>; };

struct Parameter {
  std::string name;
  ParamType type;
  std::optional<ParamValue> default_value;  // nullopt: required
  std::string description;
  ParamValue value;
  bool is_set = false;
  std::function<void(const ParamValue&)> store;  // writes into the module's member
};

class Parameters {
 public:
  explicit Parameters(std::string owner = {}) : owner_(std::move(owner)) {}
  void set_owner(std::string owner) { owner_ = std::move(owner); }

  template <class T>
  void add(const std::string& name, T* target, T default_value, const std::string& description) {
    declare(name, ParamTraits<T>::type, ParamValue(typename ParamTraits<T>::Stored(default_value)), description,
            storer(target));
    *target = default_value;
  }
  template <class T>
  void add_required(const std::string& name, T* target, const std::string& description) {
    declare(name, ParamTraits<T>::type, std::nullopt, description, storer(target));
  }
  // Parameters without a C++ member (Python modules): the value lives here.
  void declare(const std::string& name, ParamType type, std::optional<ParamValue> default_value,
               const std::string& description, std::function<void(const ParamValue&)> store = {});

  // Throws ParameterError naming the module and the parameter on an unknown name or a wrong type.
  void set(const std::string& name, ParamValue value);
  void check_required() const;
  bool has(const std::string& name) const { return find(name) != nullptr; }
  const Parameter& get(const std::string& name) const;  // ParameterError listing the names on an unknown one
  // The current value; ParameterError for a required parameter not set yet (it has none).
  const ParamValue& value(const std::string& name) const;
  const std::vector<Parameter>& list() const { return params_; }

 private:
  ParamValue checked(const std::string& name, ParamType type, ParamValue value) const;
  // Writes a value into the module's member; an int64 that the member's type cannot hold is a
  // std::out_of_range (set() names the parameter), not a silent truncation.
  template <class T>
  static std::function<void(const ParamValue&)> storer(T* target) {
    using S = typename ParamTraits<T>::Stored;
    return [target](const ParamValue& v) {
      const S& x = std::get<S>(v);
      if constexpr (std::is_integral_v<T> && !std::is_same_v<T, bool> && !std::is_same_v<T, S>) {
        if (x < static_cast<S>(std::numeric_limits<T>::min()) || x > static_cast<S>(std::numeric_limits<T>::max()))
          throw std::out_of_range(std::to_string(x) + " does not fit its range " +
                                  std::to_string(std::numeric_limits<T>::min()) + ".." +
                                  std::to_string(std::numeric_limits<T>::max()));
      }
      *target = static_cast<T>(x);
    };
  }
  const Parameter* find(const std::string& name) const;
  ParameterError unknown(const std::string& name) const;
  std::string owner_;
  std::vector<Parameter> params_;
};

}  // namespace fw
