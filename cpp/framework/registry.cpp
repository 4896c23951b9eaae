#include "framework/registry.hpp"

#include <stdexcept>

namespace fw {

ModuleRegistry& ModuleRegistry::instance() {
  static ModuleRegistry registry;
  return registry;
}

bool ModuleRegistry::add(ModuleInfo info) {
  const std::string name = info.name;
  auto [it, added] = modules_.emplace(name, info);
  if (!added)
    conflicts_.push_back("C++ module name '" + name + "' is registered twice: by " + it->second.source + " and by " +
                         info.source + " (ECLRECO_REGISTER_MODULE): rename one");
  return added;
}

const ModuleInfo* ModuleRegistry::find(const std::string& name) const {
  auto it = modules_.find(name);
  return it == modules_.end() ? nullptr : &it->second;
}

std::shared_ptr<Module> ModuleRegistry::create(const std::string& name) const {
  const ModuleInfo* info = find(name);
  if (!info) throw std::out_of_range("no C++ module named '" + name + "'");
  auto m = info->factory();
  m->set_identity(info->name, info->description);
  return m;
}

std::vector<const ModuleInfo*> ModuleRegistry::list() const {
  std::vector<const ModuleInfo*> out;
  for (const auto& [name, info] : modules_) out.push_back(&info);
  return out;
}

}  // namespace fw
