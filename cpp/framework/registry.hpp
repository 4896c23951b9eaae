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
};

class ModuleRegistry {
 public:
  static ModuleRegistry& instance();
  bool add(ModuleInfo info);
  const ModuleInfo* find(const std::string& name) const;
  std::shared_ptr<Module> create(const std::string& name) const;  // throws for an unknown name
  std::vector<const ModuleInfo*> list() const;

 private:
  std::map<std::string, ModuleInfo> modules_;
};

}  // namespace fw

#define ECLRECO_REGISTER_MODULE(CLASS, NAME, DESCRIPTION)                                     \
  namespace {                                                                                 \
  [[maybe_unused]] const bool registered_##CLASS = ::fw::ModuleRegistry::instance().add(      \
      {NAME, DESCRIPTION, [] { return std::static_pointer_cast<::fw::Module>(std::make_shared<CLASS>()); }}); \
  }
