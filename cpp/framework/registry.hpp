// C++ modules register themselves by name with ECLRECO_REGISTER_MODULE in their .cpp file.
#pragma once
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "framework/module.hpp"

namespace fw {

struct ModuleInfo {
  std::string name, description;
  std::function<std::shared_ptr<Module>()> factory;
  std::string source;  // the .cpp file that registered it (__FILE__)
};

class ModuleRegistry {
 public:
  static ModuleRegistry& instance();
  // A name registered a second time keeps the first module and is recorded in conflicts(): which of
  // two files registers first depends on the link order, so the second is never silently dropped.
  bool add(ModuleInfo info);
  // "C++ module name 'X' is registered twice: a.cpp and b.cpp ...", one per name taken again; the
  // bindings refuse to load while there is one (registration runs before main, where nothing can throw).
  const std::vector<std::string>& conflicts() const { return conflicts_; }
  const ModuleInfo* find(const std::string& name) const;
  std::shared_ptr<Module> create(const std::string& name) const;  // throws for an unknown name
  std::vector<const ModuleInfo*> list() const;

 private:
  std::map<std::string, ModuleInfo> modules_;
  std::vector<std::string> conflicts_;
};

}  // namespace fw

#define ECLRECO_REGISTER_MODULE(CLASS, NAME, DESCRIPTION)                                     \
  namespace {                                                                                 \
  [[maybe_unused]] const bool registered_##CLASS = ::fw::ModuleRegistry::instance().add(      \
      {NAME, DESCRIPTION, [] { return std::static_pointer_cast<::fw::Module>(std::make_shared<CLASS>()); },   \
       __FILE__});                                                                            \
  }
