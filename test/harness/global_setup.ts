import {chooseVulkanDrivers} from './webgpu';

/** Runs once in jest's parent process, whose environment workers inherit. */
export default function globalSetup(): void {
  chooseVulkanDrivers();
}
